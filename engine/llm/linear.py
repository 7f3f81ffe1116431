"""y = x @ W.T + b with the weight prepacked once into oneDNN's blocked layout.

Decode multiplies a few rows by every weight matrix, so a step is bound by how fast the weights
stream from memory. On this project's CPUs (2-core EPYC, AVX2) `F.linear` (MKL sgemm on a
row-major weight) reads weights at ~16-17 GB/s for one row and ~6-8 GB/s for 2-8 rows; the same
matmul on a weight reordered by oneDNN reads at ~22-30 GB/s for 1 row and ~16-26 GB/s for 2-8
rows (`python -m client.bench_components --only llm`, the "gate|up weight matmuls" rows; see
docs/PERFORMANCE.md), and is as fast as sgemm for prefill-sized batches. The packing hint is the
row count oneDNN tiles for; 8 (the default in-flight batch) cost ~5-10% at 1 row against a hint
of 1 and won at 4-8 rows in a one-off sweep of hints 1/2/4/8/16.
Other dtypes and builds without oneDNN keep the plain weight and `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_ROWS_HINT = 8


def onednn_packing_available(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        # weight: [out, in]; bias: [out] or None
        self.nbytes = weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
        self.bias = bias
        self.packed = onednn_packing_available(weight.dtype)
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, in] -> [N, out]
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
