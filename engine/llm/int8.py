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
ROW_BLOCK, COL_CHUNK = 4, 16  # the kernel's packed layout (pack_rows)


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


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    # q: [O, K] int8 -> [ceil(O/4), ceil(K/16), 4, 16], zero-padded: the kernel's layout, in which each
    # 64-byte line holds 16 columns of 4 rows, so a block of 4 rows streams as one sequential run
    rows, cols = q.shape
    padded_rows, padded_cols = -(-rows // ROW_BLOCK) * ROW_BLOCK, -(-cols // COL_CHUNK) * COL_CHUNK
    if (padded_rows, padded_cols) != (rows, cols):
        q = F.pad(q, (0, padded_cols - cols, 0, padded_rows - rows))
    return q.view(padded_rows // ROW_BLOCK, ROW_BLOCK, padded_cols // COL_CHUNK, COL_CHUNK).permute(0, 2, 1, 3).contiguous()


class Int8Rows:
    """int8 rows in the kernel's packed layout + one fp32 scale per row; looked up like a tensor (the int8
    embedding table, and the rows of an Int8Weight)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int):
        self.packed, self.scale, self.in_features = packed, scale, in_features  # pack_rows(q), [O], K

    @classmethod
    def quantize(cls, table: torch.Tensor) -> Int8Rows:
        q, scale = quantize_rows(table)
        return cls(pack_rows(q), scale, table.shape[1])

    def int8(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: int64 [n] -> [n, K] int8
        rows = self.packed[ids // ROW_BLOCK, :, ids % ROW_BLOCK, :]  # [n, K/16, 16]
        return rows.reshape(len(ids), -1)[:, : self.in_features]

    def block(self, start: int, end: int) -> torch.Tensor:
        # rows start..end-1 (start a multiple of 4) -> [end - start, K] int8
        packed = self.packed[start // ROW_BLOCK : -(-end // ROW_BLOCK)]
        return packed.permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * COL_CHUNK)[: end - start, : self.in_features]

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: int64 [n] -> [n, K] float32
        return dequantize_rows(self.int8(ids), self.scale[ids])


class Int8Weight:
    """One [O, K] matrix as int8 rows + fp32 scales; called like engine.llm.linear.Linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        module, reason = cpu_ops.load()
        if module is None:
            raise RuntimeError(f"int8 weights need the int8 kernel: {reason}")
        self._linear = module.int8_linear
        self.out_features, self.in_features = weight.shape
        self.rows = Int8Rows.quantize(weight)
        self.bias = None if bias is None else bias.float().contiguous()
        pad = self.rows.packed.shape[0] * ROW_BLOCK - self.out_features  # the kernel computes padded rows too
        self._scale = F.pad(self.rows.scale, (0, pad))
        self._bias = None if bias is None else F.pad(self.bias, (0, pad))
        self._pad_cols = self.rows.packed.shape[1] * COL_CHUNK - self.in_features
        rows = max(ROW_BLOCK, DEQUANT_BLOCK_BYTES // (4 * self.in_features) // ROW_BLOCK * ROW_BLOCK)
        self._blocks = [(start, min(start + rows, self.out_features)) for start in range(0, self.out_features, rows)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, K] float32 -> [N, O]
        if x.shape[0] <= KERNEL_MAX_ROWS:
            y = self._linear(F.pad(x, (0, self._pad_cols)) if self._pad_cols else x, self.rows.packed, self._scale, self._bias)
            return y if y.shape[1] == self.out_features else y[:, : self.out_features].contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start, end in self._blocks:
            bias = None if self.bias is None else self.bias[start:end]
            out[:, start:end] = F.linear(x, dequantize_rows(self.rows.block(start, end), self.rows.scale[start:end]), bias)
        return out
