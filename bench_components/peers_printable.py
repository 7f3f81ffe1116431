"""The whole-request benchmark's checkpoint replies in printable ASCII: the output rows of every other
token are zeroed, so that every generated token is a whole character.

Why: both servers hold back the text of a token that ends inside a UTF-8 character until the character
is complete (ours: engine/detokenize.py; llama-server: its UTF-8 check before sending), and AIPerf
times the first token by the first chunk with content. A random-weight model that picks byte tokens
(as this one does for most images) then streams nothing until the end, and AIPerf's TTFT becomes the
whole request's latency. With the rows zeroed those tokens' logits are 0 while the best printable
token's is positive, so greedy decoding (both servers are sent temperature 0) never picks them. Speed
does not depend on the weights' values; both servers read this same checkpoint (the GGUFs are
converted from it). The tokens a prompt uses (the tokenizer's added and special tokens) keep their rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.tokenizer import TextTokenizer, load_tokenizer

MARK = "output_rows"  # generated_by.json key: its value changes the GGUF conversions' stamp
VALUE = "printable-ascii"


def printable_rows(checkpoint: Path, vocab_size: int) -> torch.Tensor:
    """-> bool [vocab_size]: the ids whose row stays (printable ASCII alone, or an added token)."""
    texts = TextTokenizer(checkpoint).token_texts(range(vocab_size))
    keep = torch.tensor([bool(t) and t.isascii() and t.isprintable() for t in texts])
    for token in load_tokenizer(checkpoint).get_added_tokens_decoder():
        if token < vocab_size:
            keep[token] = True
    return keep


def make_replies_printable(checkpoint: Path) -> int:
    """Zeroes the other rows of the (tied) embedding / lm_head of a custom-format checkpoint, once.
    -> how many rows stay."""
    stamp_file = checkpoint / "generated_by.json"
    stamp = json.loads(stamp_file.read_text(encoding="utf-8"))
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["llm_config"]
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
    names = [n for n in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight") if n in index]
    keep = printable_rows(checkpoint, config["vocab_size"])
    if stamp.get(MARK) == VALUE:
        return int(keep.sum())
    for shard in sorted({index[n] for n in names}):
        path = checkpoint / shard
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name in names:
            if index[name] == shard:
                tensors[name][~keep] = 0
        save_file(tensors, str(path), metadata={"format": "pt"})
    stamp[MARK] = VALUE
    stamp_file.write_text(json.dumps(stamp), encoding="utf-8")
    return int(keep.sum())
