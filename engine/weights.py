"""Read a checkpoint's safetensors (single file or sharded) under canonical InternVL key names.

transformers saves InternVLForConditionalGeneration as `vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`; the in-memory layout is `model.vision_tower.*`,
`model.language_model.*`, `lm_head.*`. Both map to: `vision_tower.*`, `multi_modal_projector.*`,
`language_model.*` (decoder, without `model.`), `lm_head.*`.

Mixture-of-experts weights are canonical per expert, as the hub's Qwen3-MoE checkpoints and
transformers 5's `save_pretrained` store them (`mlp.experts.{e}.gate_proj.weight`, …); the fused
in-memory layout of transformers 5 (`mlp.experts.gate_up_proj` [E, 2I, H] = gate rows then up rows,
`mlp.experts.down_proj` [E, H, I]) is split into those names on load. GPT-OSS stores its experts
fused and transposed (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], with biases; the hub's
layout and transformers' own): they pass through whole (engine/llm/moe.py reads them), told apart by
the config's model_type since a square expert (I = H, as gpt-oss-20b) has the same shape either way.

Custom-format checkpoints (`vision_model.*`, `mlp1.*`, `language_model.model.*`,
`language_model.lm_head.*`) map to the same names (engine/custom_format.py: the InternViT names of
transformers' converter, its fused `attn.qkv` split into q/k/v). Their InternLM2 language models
(`language_model.model.tok_embeddings`, `layers.N.attention.wqkv` / `wo`, `feed_forward.w1/w2/w3`,
`attention_norm`, `ffn_norm`, `language_model.output`) map to the Llama names, the grouped `wqkv`
split into q/k/v by the llm_config's head counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.custom_format import hf_name, llama_name, split_qkv, split_wqkv, wqkv_layout

_PREFIXES = (  # (stored prefix, canonical prefix), most specific first
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "language_model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def canonical_name(key: str) -> str:
    if key.startswith(("vision_model.", "mlp1.")):  # custom format
        key = hf_name(key)
    key = llama_name(key)  # InternLM2 (custom format) decoder names; others pass through
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
    out = dict(iter_weights(path, prefix, dtype))
    if required and not out:
        raise KeyError(f"checkpoint {path} has no weights under {prefix!r}")
    return out


def iter_weights(path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name without `prefix`, tensor) for every canonical name under `prefix`, file by file (fused
    q/k/v and experts split); dtype None keeps the stored one."""
    llm = None  # the checkpoint's language-model config, read at the first tensor that needs it
    for file in checkpoint_files(Path(path)):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = canonical_name(key)
                if not name.startswith(prefix):
                    continue
                tensor = f.get_tensor(key)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                if ".self_attn.wqkv." in name:
                    llm = _llm_config(Path(path)) if llm is None else llm
                    parts = split_wqkv(name, tensor, wqkv_layout(llm))
                else:
                    parts = split_qkv(name, tensor)
                for part, tensor in parts.items():
                    part = part[len(prefix) :]
                    if tensor.ndim == 3 and ".experts." in part:
                        llm = _llm_config(Path(path)) if llm is None else llm
                        if llm.get("model_type") != "gpt_oss":  # Qwen3-MoE's fused layout: split per expert
                            yield from _per_expert(part, tensor).items()
                            continue
                    yield part, tensor


def _llm_config(path: Path) -> dict:
    """The language model's config as stored: text_config, llm_config (custom format), or the file
    itself (an LLM-only checkpoint); {} for bare weights (fused experts then read as Qwen3-MoE's)."""
    if not (path / "config.json").is_file():
        return {}
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return config.get("text_config") or config.get("llm_config") or config


def _per_expert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Splits a fused expert tensor into per-expert weights (views); other tensors pass through."""
    base, _, leaf = name.rpartition(".")
    if not base.endswith("experts") or leaf not in ("gate_up_proj", "down_proj") or tensor.ndim != 3:
        return {name: tensor}
    if leaf == "down_proj":
        return {f"{base}.{e}.down_proj.weight": w for e, w in enumerate(tensor)}
    out = {}
    for e, w in enumerate(tensor):
        out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = w.chunk(2)
    return out
