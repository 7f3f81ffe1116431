"""Text ↔ ids with the checkpoint's fast tokenizer (tokenizer.json), as `tokenizer(query)` would."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, path: str | Path, skip_special_tokens: bool = True):
        self._tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self.skip_special_tokens = skip_special_tokens  # decode as the template's chat() does
        # What the post-processor adds around a text (e.g. a Llama BOS): added once per prompt,
        # however many pieces the prompt is encoded in.
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
        self.prefix_ids, self.suffix_ids = full[:start], full[start + len(bare) :]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=self.skip_special_tokens)
