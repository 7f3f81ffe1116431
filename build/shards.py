"""Safetensors checkpoints written as transformers writes them, streamed: each shard is saved as soon
as it is full and its tensors freed, so a 32B model never has to fit in memory at once. One shard is
`model.safetensors`; more are `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 4 * 1024**3


class ShardWriter:
    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = Path(out), shard_bytes
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in [*self.out.glob("model*.safetensors"), *self.out.glob("model.safetensors.index.json")]:
            stale.unlink()
        self._shards: list[list[str]] = []  # the tensor names of each saved shard
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_bytes:
            self._save()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def __contains__(self, name: str) -> bool:
        """Whether a tensor of that name was added."""
        return name in self._pending or any(name in names for names in self._shards)

    def close(self) -> None:
        """Saves the last shard and gives every shard its final name (plus the index when > 1)."""
        if self._pending or not self._shards:
            self._save()
        if len(self._shards) == 1:
            self._part(0).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            self._part(i).rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")

    def _save(self) -> None:
        save_file(self._pending, str(self._part(len(self._shards))), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _part(self, i: int) -> Path:
        return self.out / f"model-part-{i + 1:05d}.safetensors"
