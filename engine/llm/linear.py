"""y = x @ W.T + b for the CPU LLM's matrices, with the fastest kernel measured per precision and row count.

Decode multiplies a few rows by every weight matrix, so a step is bound by how fast the weights
stream from memory; prefill multiplies hundreds of rows and is bound by arithmetic.

float32 weights stay in their plain row-major layout, on 2 MiB pages (engine/llm/huge_pages.py).
Up to DENSE_MAX_ROWS rows go to the compiled kernel of engine/llm/csrc/dense_linear.cpp, which
streams them at the memory's limit (one lm_head product, 151936 × 1024, 1 row: 18.6 ms against
25.0 ms for oneDNN on its own prepacked layout and 36 ms for MKL's sgemm; equal to oneDNN at 4
rows; docs/PERFORMANCE.md). More rows go to oneDNN's matmul on the same plain
weight, which costs 2-5% against a prepacked one at 32-512 rows (and 1.3-2× less than sgemm), so one
copy of the weights serves both. Without the compiled kernels (or oneDNN) the weight is prepacked
for oneDNN (or left to `F.linear`).

float16 weights (`llm_weights="float16"`, engine/llm/precision.py) go to FBGEMM's packed fp16 GEMM
(`quantized.linear_prepack_fp16` once at load, `quantized.linear_dynamic_fp16` per call): fp32
activations in and out, each weight converted to fp32 in registers, fp32 accumulation, so the
result is the fp32 product of the fp16-rounded weight; it reads half the bytes of the fp32 path.
On this project's CPUs (no AVX512-FP16) oneDNN refuses fp16 weights and `F.linear` in fp16 runs a
slow generic kernel (docs/PERFORMANCE.md, "LLM weights in float16").

int8 weights (`llm_weights="int8"`) are engine/llm/int8.py's Int8Weight: int8 rows, one fp32 scale
per row, an AVX2 kernel for decode-sized products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.llm import cpu_ops
from engine.llm.huge_pages import huge_page_copy
from engine.llm.int8 import Int8Weight

PACK_ROWS_HINT = 8
DENSE_MAX_ROWS = 4  # rows up to which the dense kernel beats oneDNN (equal at 4 and 8, behind at 16)
# oneDNN builds and caches (up to ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024) one primitive per input row
# count, each owning a scratchpad: prefill chunks and MoE expert batches of ever new lengths grew a
# served llm by ~1 MiB per new length (a 300-request soak: +150 MiB, no plateau; docs/API.md). So rows
# run in blocks of BLOCK_ROWS (as fast as one call: 2000×2048 by 2048×5632, 242 vs 248 ms), and a block
# above EXACT_ROWS is padded to one of 8 sizes per power of two (at most 12.5% more rows): ~56 shapes
# per weight, whatever the traffic.
EXACT_ROWS = 16
BLOCK_ROWS = 512


def padded_rows(n: int) -> int:
    if n <= EXACT_ROWS:
        return n
    step = 1 << (n.bit_length() - 4)  # n in [2^k, 2^(k+1)) -> multiples of 2^(k-3)
    return -(-n // step) * step


def onednn_packing_available(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, precision: str = "float32"):
        # weight: [out, in]; bias: [out] or None; precision: "float32" (the weight's own dtype),
        # "float16" (values already checked to fit: engine/llm/precision.py) or "int8"; activations fp32
        self.bias = bias
        self.out_features = weight.shape[0]
        self.precision = precision
        self.int8 = Int8Weight(weight, bias) if precision == "int8" else None
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        weight_bytes = {"float16": 2 * weight.numel(), "int8": weight.numel() + 4 * weight.shape[0]}
        self.nbytes = weight_bytes.get(precision, weight.numel() * weight.element_size()) + bias_bytes
        onednn = onednn_packing_available(weight.dtype)
        kernels = cpu_ops.load()[0] if precision == "float32" and weight.dtype == torch.float32 and weight.shape[1] % 8 == 0 else None
        self._dense = None if kernels is None else kernels.dense_linear
        self.packed = precision == "float32" and onednn and self._dense is None  # weight in oneDNN's blocked layout
        self.onednn = precision == "float32" and onednn  # oneDNN's matmul for more than DENSE_MAX_ROWS rows
        if precision == "float16":
            self.weight = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None if bias is None else bias.float())
        elif self._dense is not None:
            self.weight = huge_page_copy(weight)  # [out, in], plain: an embedding table can share it
            self.bias = None if bias is None else bias.contiguous()
        elif self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
        elif self.int8 is None:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        if self.int8 is not None:
            return self.int8(x)
        if self.precision == "float16":
            return torch.ops.quantized.linear_dynamic_fp16(x, self.weight)
        if self._dense is not None and x.shape[0] <= DENSE_MAX_ROWS:
            return self._dense(x, self.weight, self.bias)
        if not self.onednn:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] <= BLOCK_ROWS:
            return self._onednn(x)
        out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        for start in range(0, x.shape[0], BLOCK_ROWS):
            out[start : start + BLOCK_ROWS] = self._onednn(x[start : start + BLOCK_ROWS])
        return out

    @property
    def plain(self) -> bool:
        """The fp32 weight is kept as it is ([out, in], row-major) for the compiled kernel and oneDNN."""
        return self._dense is not None

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        # x: [n ≤ BLOCK_ROWS, in] -> [n, out]
        n, rows = x.shape[0], padded_rows(x.shape[0])
        padded = x if rows == n else F.pad(x, (0, 0, 0, rows - n))
        return torch.ops.mkldnn._linear_pointwise(padded, self.weight, self.bias, "none", [], "")[:n]
