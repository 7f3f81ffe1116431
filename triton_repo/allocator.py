"""glibc malloc settings of the served processes: big tensors in tritonserver go back to the OS.

glibc serves an allocation above its mmap threshold with its own mapping, unmapped on free; but the
threshold is dynamic (glibc malloc/malloc.c, "M_MMAP_THRESHOLD"): each free of such a chunk raises it
to that chunk's size, up to 32 MiB. tritonserver copies every ensemble tensor (pixel values of up to
max_tiles tiles, image features) through buffers of ever new sizes from many threads, so after a few
requests they come from the heap arenas, which fragment: a 900-request soak grew tritonserver's PSS
from 43 to 283 MiB, still rising 20 MiB/min at the end (docs/API.md). A fixed threshold
(MALLOC_MMAP_THRESHOLD_ in its environment) keeps those buffers mapped and returned on free.

The python stubs inherit the environment, and a small fixed threshold costs the vision stub 15–25%
of its latency (page faults on every batch's activations), so each stub sets, first thing, what the
dynamic scheme settles at: mmap only above 32 MiB, trim the heap above 64 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util

SERVER_MMAP_THRESHOLD = 256 * 1024
STUB_MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
STUB_TRIM_THRESHOLD = 2 * STUB_MMAP_THRESHOLD  # the dynamic scheme keeps trim at twice the mmap threshold
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h


def server_environment() -> dict[str, str]:
    return {"MALLOC_MMAP_THRESHOLD_": str(SERVER_MMAP_THRESHOLD)}


def stub_settings() -> bool:
    """Called by each python model's initialize; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, STUB_MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, STUB_TRIM_THRESHOLD))
