"""int8 weight-only matrices for the CPU LLM (`llm_weights="int8"`): per-output-row symmetric scales,
fp32 activations and fp32 accumulation.

A weight row w is stored as q = round(w / s) with s = max|w| / 127 (q in [-127, 127]) and one fp32
scale s per row; y = (x · q) · s + b. Few-row products (decode) run the AVX2 kernel in
engine/llm/csrc/int8_linear.cpp, which reads each int8 weight once and widens it in registers;
larger products (prefill) dequantize a block of rows at a time to fp32 and use sgemm, where the
work is compute-, not bandwidth-bound.

The kernel is a torch C++ extension compiled once (`make setup` runs `python -m engine.llm.int8`;
torch.utils.cpp_extension caches it under TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions, named after a hash of the source so an edited kernel never loads a stale
build). Where it cannot be built or loaded (no compiler, no AVX2), `kernel()` returns None with the
reason, and the engine serves float16 weights instead with a warning (engine/llm/precision.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).parent / "csrc" / "int8_linear.cpp"
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


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.cache
def kernel():
    """-> (the compiled module or None, the reason it is None)."""
    if not _cpu_has_avx2():
        return None, "this CPU has no AVX2/FMA"
    from torch.utils import cpp_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    # torch's build runs `ninja`; the pinned wheel puts it next to this interpreter
    bindir = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        module = cpp_extension.load(
            name=f"internvl_int8_linear_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers: the engine falls back to float16
        return None, f"the int8 kernel did not build: {type(error).__name__}: {str(error).strip()[-400:]}"
    return module, ""


def int8_available() -> bool:
    module, reason = kernel()
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
        module, reason = kernel()
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


if __name__ == "__main__":  # `make setup`: compile the kernel once, so the first server start does not
    module, reason = kernel()
    print("int8 kernel:", "built" if module is not None else f"unavailable ({reason}); llm_weights='int8' falls back to float16")
