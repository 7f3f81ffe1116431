"""Guided decoding (structured outputs) for the CPU LLM engine, with xgrammar: the library behind
TensorRT-LLM's GuidedDecoder. Version 0.2.9 here; TensorRT-LLM 1.2 pins 0.1.25, whose JSON strings let
invalid UTF-8 through (1 of 20 random-weight replies). The guide types and the tokenizer information
are TensorRT-LLM's, so both paths take the same requests.

Guide types are TensorRT-LLM's names (triton_backend/inflight_batcher_llm/src/utils.cc,
getGuidedDecodingParamsFromTensors): "json" (any JSON value, no guide text), "json_schema", "regex",
"ebnf_grammar" (xgrammar's EBNF, root rule `root`). The tokenizer information is what TensorRT-LLM
reads from `xgrammar_tokenizer_info_path` (model_instance_state.cc, getGuidedDecodingConfigFromParams:
`encoded_vocab`, `tokenizer_str`, `stop_token_ids`); like its guidedDecoder.cpp, the vocabulary type
and prefix-space rule are detected from `tokenizer_str` (xgrammar's DetectMetadataFromHF).

A JSON schema compiles to compact JSON (no whitespace between tokens, xgrammar's any_whitespace off, as
vLLM's disable_any_whitespace): with free whitespace a weak or unsure model can spend its whole token
budget on blanks between two keys (seen with the random test checkpoints: 20 of 20 replies). "json"
stays xgrammar's built-in JSON grammar, as on TensorRT-LLM.

Per sequence a GrammarMatcher: before each sampled token its bitmask sets every token the grammar
cannot take next to -inf, after it the matcher advances by the token (no rollback). Sequences
without a guide never touch any of this.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable

import torch
from tokenizers import Tokenizer


COMPILED_CACHE_BYTES = 256 << 20  # xgrammar's cache of compiled grammars, keyed by the guide's text


@functools.cache
def _xgr():
    """xgrammar, imported on the first guided request (the import takes ~2 s: it loads transformers)."""
    import xgrammar

    return xgrammar


# xgrammar 0.2.9 writes a string with maxLength / minLength as a run of `[^\"\\\r\n]` characters,
# which lets the other control characters U+0000-U+001F through unescaped (invalid JSON: 2 of 20
# random-weight replies); its unbounded strings use the right class, which the bounded ones get here
LOOSE_STRING_CHARS = r"[^\"\\\r\n]"
JSON_STRING_CHARS = r"[^\0-\x1f\"\\]"


def json_schema_grammar(schema: str) -> str:
    """xgrammar's EBNF for a JSON schema: compact (no free whitespace), strings valid JSON."""
    return str(_xgr().Grammar.from_json_schema(schema, any_whitespace=False)).replace(LOOSE_STRING_CHARS, JSON_STRING_CHARS)


class GuideError(ValueError):
    """A guide that does not compile: the request's error."""


def tokenizer_info(tokenizer: Tokenizer, stop_token_ids: list[int]) -> dict:
    """TensorRT-LLM's xgrammar tokenizer info (the JSON of xgrammar_tokenizer_info_path) for a fast
    tokenizer: every token's string in id order, the tokenizer's own JSON, the stop ids."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    encoded = [""] * (max(vocab.values()) + 1)  # an id without a token (a gap) can never be generated
    for token, index in vocab.items():
        encoded[index] = token
    return {"encoded_vocab": encoded, "tokenizer_str": tokenizer.to_str(), "stop_token_ids": list(stop_token_ids)}


class GuideCompiler:
    """Compiles guides for one tokenizer and model vocabulary; compiled grammars are cached. Cheap to
    make: the tokenizer info and xgrammar's tables are built at the first guided request."""

    def __init__(self, info: Callable[[], dict], vocab_size: int):
        # info: -> tokenizer_info(); vocab_size: the model's logits width (may exceed the tokenizer's ids)
        self._info, self.vocab_size = info, vocab_size
        self._lock = threading.Lock()
        self._built = None

    def _compiler(self):
        with self._lock:
            if self._built is None:
                xgr, info = _xgr(), self._info()
                metadata = xgr.TokenizerInfo._detect_metadata_from_hf(info["tokenizer_str"])  # {vocab_type, add_prefix_space}
                tokenizer = xgr.TokenizerInfo(
                    info["encoded_vocab"][: self.vocab_size],
                    xgr.VocabType(metadata["vocab_type"]),
                    vocab_size=self.vocab_size,
                    stop_token_ids=info["stop_token_ids"],
                    add_prefix_space=metadata["add_prefix_space"],
                )
                self._built = xgr.GrammarCompiler(tokenizer, max_threads=2, cache_limit_bytes=COMPILED_CACHE_BYTES)
            return self._built

    def compile(self, guide_type: str, guide: str | None):
        compiler = self._compiler()
        compile_one = {
            "json": lambda _: compiler.compile_builtin_json_grammar(),
            "json_schema": lambda schema: compiler.compile_grammar(json_schema_grammar(schema)),
            "regex": compiler.compile_regex,
            "ebnf_grammar": compiler.compile_grammar,
        }[guide_type]
        try:
            return compile_one(guide)
        except (RuntimeError, ValueError, TypeError) as error:  # xgrammar's parse errors
            lines = str(error).strip().splitlines()
            # xgrammar's C++ errors start "[13:01:42] /project/cpp/regex_converter.cc:94: ": not the user's business
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[-1]) if lines else type(error).__name__
            raise GuideError(f"the {guide_type} guide does not compile: {reason}") from None

    def matcher(self, guide_type: str, guide: str | None, stop_token_ids: list[int]) -> GuideMatcher:
        return GuideMatcher(self.compile(guide_type, guide), stop_token_ids, self.vocab_size)


class GuideMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, compiled, stop_token_ids: list[int], vocab_size: int):
        # compiled: an xgrammar CompiledGrammar; stop_token_ids: the ids that end this sequence, which
        # the grammar allows once it is complete
        self._matcher = _xgr().GrammarMatcher(compiled, override_stop_tokens=sorted(stop_token_ids))
        self._bitmask = _xgr().allocate_token_bitmask(1, vocab_size)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [V] float32, in place: tokens the grammar cannot take next -> -inf
        self._matcher.fill_next_token_bitmask(self._bitmask)
        _xgr().apply_token_bitmask_inplace(logits.view(1, -1), self._bitmask)
        return logits

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the guide (the grammar allowed no token?)")

