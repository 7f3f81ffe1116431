"""A sentencepiece BPE `tokenizer.model` (InternLM2's, as InternVL2.5-2B/8B/26B and InternVL3-9B ship it,
without a tokenizer.json) as a fast `tokenizers.Tokenizer`, so the checkpoint loads as shipped.

Follows InternLM2's own fast tokenizer (`tokenization_internlm2_fast.py`: InternLM2Converter, "modified
from transformers' LlamaConverter"): the piece vocabulary with ids 0-2 named `<unk>`, `<s>`, `</s>` and
pieces renamed by `added_tokens_decoder`; BPE merges ordered by piece score (transformers 5
`generate_merges`), byte fallback; normalizer = `▁` prepended when the model adds a dummy prefix, then
spaces → `▁`; no pre-tokenizer; decoder = `▁` → space, byte fallback, fuse, one leading space
stripped; `tokenizer_config.json`'s added tokens (InternVL's `<img>`, `</img>`, `<IMG_CONTEXT>`, …) at
their ids; BOS prepended when `add_bos_token` (InternLM2Tokenizer's default: true). A slow
InternLM2Tokenizer encodes each text between added tokens with sentencepiece, which is what these
rules reproduce (tests/test_sentencepiece_tokenizer.py checks it against sentencepiece itself).
Models with sentencepiece normalization rules (a precompiled charmap, or removal of extra
whitespace) are refused: the converter would not reproduce them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from engine.text_config import ConfigError

SPECIAL_PIECES = ("<unk>", "<s>", "</s>")  # InternLM2Converter.vocab: ids 0, 1, 2


@functools.lru_cache(maxsize=4)  # every stage of a server process loads the checkpoint's tokenizer
def _converted(path: Path, stamp: tuple) -> str:
    return _convert(path).to_str()


def tokenizer_from_sentencepiece(path: Path) -> Tokenizer:
    files = [path / "tokenizer.model", path / "tokenizer_config.json"]
    stamp = tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in files)
    return Tokenizer.from_str(_converted(path, stamp))


def _convert(path: Path) -> Tokenizer:
    from transformers.convert_slow_tokenizer import import_protobuf  # sentencepiece_model_pb2
    from transformers.tokenization_utils_base import generate_merges

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    where = f"{path / 'tokenizer.model'}"
    if proto.trainer_spec.model_type != 2:
        raise ConfigError(f"{where} is not a BPE sentencepiece model (model_type {proto.trainer_spec.model_type}); only BPE is supported")
    spec = proto.normalizer_spec
    if spec.precompiled_charsmap or spec.remove_extra_whitespaces:
        raise ConfigError(
            f"{where} normalizes text ({spec.name!r}, remove_extra_whitespaces {spec.remove_extra_whitespaces}); "
            "only identity normalization is supported: save a tokenizer.json with the model's own fast tokenizer"
        )
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()}

    pieces = [p.piece for p in proto.pieces]
    pieces[: len(SPECIAL_PIECES)] = SPECIAL_PIECES
    atomic = {i for i, p in enumerate(proto.pieces) if p.type in (3, 4)}  # control and user-defined pieces
    for i, token in added.items():
        if i < len(pieces):
            pieces[i] = token["content"]
            atomic.add(i)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: p.score for piece, p in zip(pieces, proto.pieces)}
    skip = {pieces[i] for i in atomic} | set(SPECIAL_PIECES)
    merges = generate_merges(vocab, scores, skip_tokens=skip)
    tok = Tokenizer(BPE(vocab, merges, unk_token=proto.trainer_spec.unk_piece or "<unk>", fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])

    def added_token(i: int) -> AddedToken:
        t = added.get(i, {"content": pieces[i], "special": proto.pieces[i].type == 3 or i < len(SPECIAL_PIECES)})
        return AddedToken(
            t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
            rstrip=t.get("rstrip", False), normalized=False, special=t.get("special", False),
        )  # fmt: skip

    for i in sorted(atomic | {0, 1, 2}):
        token = added_token(i)
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
    beyond = sorted(i for i in added if i >= len(pieces))
    if beyond != list(range(len(pieces), len(pieces) + len(beyond))):
        raise ConfigError(f"{config_file} added_tokens_decoder ids beyond the model's {len(pieces)} pieces must follow on without gaps, got {beyond}")
    for i in beyond:
        t = added[i]
        token = AddedToken(t["content"], normalized=False, special=t.get("special", False))
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
    if config.get("add_bos_token", True):
        bos = pieces[proto.trainer_spec.bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", special_tokens=[(bos, proto.trainer_spec.bos_id)])
    if config.get("add_eos_token", False):
        raise ConfigError(f"{config_file} 'add_eos_token' true is not supported (InternLM2Tokenizer's default is false)")
    return tok
