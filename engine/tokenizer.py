"""Text ↔ ids with the checkpoint's fast tokenizer (tokenizer.json), as `tokenizer(query)` would."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from engine.text_config import ConfigError


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The checkpoint's tokenizer.json, else its sentencepiece tokenizer.model (InternLM2 checkpoints
    ship only that) converted as its fast tokenizer would (engine/sentencepiece_tokenizer.py)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "tokenizer.model").is_file():
        from engine.sentencepiece_tokenizer import tokenizer_from_sentencepiece

        return tokenizer_from_sentencepiece(path)
    raise ConfigError(f"{path} has neither tokenizer.json nor a sentencepiece tokenizer.model")


class TextTokenizer:
    def __init__(self, path: str | Path, skip_special_tokens: bool = True):
        self.fast = load_tokenizer(path)  # the checkpoint's tokenizers.Tokenizer
        self.skip_special_tokens = skip_special_tokens  # decode as the template's chat() does
        # What the post-processor adds around a text (e.g. a Llama BOS): added once per prompt,
        # however many pieces the prompt is encoded in.
        bare = self.fast.encode("a", add_special_tokens=False).ids
        full = self.fast.encode("a", add_special_tokens=True).ids
        start = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
        self.prefix_ids, self.suffix_ids = full[:start], full[start + len(bare) :]

    def encode(self, text: str) -> list[int]:
        return self.fast.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.fast.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def token_texts(self, ids) -> list[str]:
        """Each token decoded alone, special tokens included (the `token` of a log probability, as
        vLLM shows it: a token that ends inside a character decodes to U+FFFD)."""
        return self.fast.decode_batch([[int(i)] for i in ids], skip_special_tokens=False)
