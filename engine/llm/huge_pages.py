"""Weight tensors on 2 MiB pages (Linux transparent huge pages), for the decode kernels that stream them.

A decode step reads every weight once; on 4 KiB pages that is a TLB miss every 4 KiB, and the
hardware prefetcher stops at each page boundary. Linux gives huge pages to memory that asks for them
with madvise(MADV_HUGEPAGE) where THP is in "madvise" or "always" mode (the default of most
distributions; this project's VMs run "madvise"). Asking before the first touch makes the page faults
allocate 2 MiB pages directly, so nothing is copied twice. Where the kernel says no (THP "never", not
Linux) the tensor is an ordinary one: only speed differs. Measured on the 2-core EPYC (one pass over
the Qwen3-0.6B fp32 matrices through engine/llm/csrc/dense_linear.cpp, 8 interleaved rounds): 67.4 ms
on 2 MiB pages against 69.8 ms on 4 KiB ones; the int8 rows, one sequential stream per block, gain
nothing (18.1 vs 18.3 ms) and stay on ordinary pages.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
MIN_BYTES = 2 * HUGE_PAGE  # smaller tensors would mostly sit in the unaligned ends anyway


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_MADVISE = _madvise()


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (contiguous) in memory aligned to and advised for 2 MiB pages; small tensors, and any
    where madvise is missing, as they are (contiguous)."""
    nbytes = tensor.numel() * tensor.element_size()
    if _MADVISE is None or nbytes < MIN_BYTES:
        return tensor.contiguous()
    # A fresh anonymous mapping, never touched: madvise must come before the first fault. torch.empty
    # may reuse heap memory an earlier tensor already faulted in on 4 KiB pages (glibc raises its mmap
    # threshold after large frees), which madvise then leaves as it is: seen in a long test process.
    raw = torch.from_numpy(np.frombuffer(mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8))  # keeps the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE
    region = raw[offset : offset + nbytes]
    _MADVISE(region.data_ptr(), nbytes, MADV_HUGEPAGE)  # refused (THP off): 4 KiB pages, same data
    copy = region.view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy
