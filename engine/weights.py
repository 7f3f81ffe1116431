"""Read a checkpoint's safetensors (single file or sharded) under canonical InternVL key names.

transformers saves InternVLForConditionalGeneration as `vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`; the in-memory layout is `model.vision_tower.*`,
`model.language_model.*`, `lm_head.*`. Both map to: `vision_tower.*`, `multi_modal_projector.*`,
`language_model.*` (decoder, without `model.`), `lm_head.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

_PREFIXES = (  # (stored prefix, canonical prefix), most specific first
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def canonical_name(key: str) -> str:
    for stored, canonical in _PREFIXES:
        if key.startswith(stored):
            return canonical + key[len(stored) :]
    return key


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")


def load_weights(
    path: str | Path, prefix: str, dtype: torch.dtype = torch.float32, required: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors whose canonical name starts with `prefix`, keyed by the rest of the name."""
    out = {}
    for file in checkpoint_files(Path(path)):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = canonical_name(key)
                if name.startswith(prefix):
                    out[name[len(prefix) :]] = f.get_tensor(key).to(dtype)
    if required and not out:
        raise KeyError(f"checkpoint {path} has no weights under {prefix!r}")
    return out
