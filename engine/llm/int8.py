"""int8 weight-only matrices for the CPU LLM (`llm_weights="int8"`): per-output-row symmetric scales,
fp32 activations and fp32 accumulation.

A weight row w is stored as q = round(w / s) with s = max|w| / 127 (q in [-127, 127]) and one fp32
scale s per row; y = (x · q) · s + b. Few-row products (decode) run the AVX2 kernel in
engine/llm/csrc/int8_linear.cpp (compiled by engine/llm/cpu_ops.py), which reads each int8 weight
once and widens it in registers; larger products (prefill) dequantize a block of rows at a time to
fp32 and use sgemm, where the work is compute-, not bandwidth-bound. Without the compiled kernel the
engine serves float16 weights instead, with a warning (engine/llm/precision.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from engine.llm import cpu_ops

KERNEL_MAX_ROWS = 16  # above this many activation rows, dequantize blocks and use sgemm
DEQUANT_BLOCK_BYTES = 8 << 20  # fp32 bytes of one dequantized block of weight rows


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # weight: [O, K] float -> (q: [O, K] int8, scale: [O] float32); an all-zero row gets scale 1.
    # Block by block, so a vocab-sized matrix needs no full-size fp32 temporaries.
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    rows = max(1, DEQUANT_BLOCK_BYTES // (4 * max(1, weight.shape[1])))
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].float()
        peak = w.abs().amax(dim=1)
        s = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        q[start : start + rows] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start : start + rows] = s
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q: [O, K] int8, scale: [O] -> [O, K] float32
    return q.float() * scale[:, None]


def int8_available() -> bool:
    module, reason = cpu_ops.load()
    if module is None:
        warnings.warn(f"llm_weights='int8' unavailable ({reason}); serving float16 weights instead", stacklevel=3)
    return module is not None


class Int8Rows:
    """A [V, H] table as int8 rows + scales, looked up like a tensor (the int8 embedding table)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale  # [V, H] int8, [V] float32

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: int64 [n] -> [n, H] float32
        return dequantize_rows(self.q[ids], self.scale[ids])


class Int8Weight:
    """One [O, K] matrix as int8 rows + fp32 scales; called like engine.llm.linear.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.q, self.scale = quantize_rows(weight)
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = self.q.shape
        module, reason = cpu_ops.load()
        if module is None:
            raise RuntimeError(f"int8 weights need the int8 kernel: {reason}")
        self._linear = module.int8_linear
        rows = max(1, DEQUANT_BLOCK_BYTES // (4 * self.in_features))
        self._blocks = [(start, min(start + rows, self.out_features)) for start in range(0, self.out_features, rows)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, K] float32 -> [N, O]
        if x.shape[0] <= KERNEL_MAX_ROWS:
            return self._linear(x, self.q, self.scale, self.bias)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start, end in self._blocks:
            bias = None if self.bias is None else self.bias[start:end]
            out[:, start:end] = F.linear(x, dequantize_rows(self.q[start:end], self.scale[start:end]), bias)
        return out
