"""engine/llm/csrc/dense_linear.cpp (fp32 weights, decode-sized products), the Linear that routes rows
to it or to oneDNN, and the 2 MiB-page weight copies of engine/llm/huge_pages.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.llm import cpu_ops
from engine.llm.huge_pages import HUGE_PAGE, MIN_BYTES, huge_page_copy
from engine.llm.linear import DENSE_MAX_ROWS, Linear


def _kernel():
    module, reason = cpu_ops.load()
    assert module is not None, reason  # CI machines have gcc and AVX2
    return module.dense_linear


def _float64(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("out_features, in_features", [(1, 8), (7, 24), (300, 64), (1030, 1032)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_matches_float64(rows, out_features, in_features, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    x = torch.randn(rows, in_features, generator=gen)
    got = _kernel()(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = _float64(x, w, b)
    tolerance = 1e-5 * in_features**0.5 * float(expected.abs().max().clamp(min=1))
    assert float((got.double() - expected).abs().max()) <= tolerance


def test_a_row_sums_in_the_same_order_whatever_shares_its_batch():
    """Rows run 4, 2 or 1 at a time and outputs 4 or 1 at a time: each dot product must still sum in
    one order, so a sequence's logits do not change with the batch around it (bit for bit)."""
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(1027, 520, generator=gen), torch.randn(1027, generator=gen)
    x = torch.randn(16, 520, generator=gen)
    alone = torch.cat([_kernel()(x[i : i + 1], w, b) for i in range(16)])
    for n in (2, 3, 4, 5, 7, 16):
        assert torch.equal(_kernel()(x[:n], w, b), alone[:n]), n
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_kernel()(x, w, b), alone)
    finally:
        torch.set_num_threads(threads)


def test_bad_shapes_are_refused_with_the_reason():
    kernel = _kernel()
    with pytest.raises(RuntimeError, match="multiple of 8"):
        kernel(torch.randn(1, 12), torch.randn(4, 12), None)
    with pytest.raises(RuntimeError, match="columns"):
        kernel(torch.randn(1, 16), torch.randn(4, 24), None)
    with pytest.raises(RuntimeError, match="float32"):
        kernel(torch.randn(1, 16), torch.randn(4, 16).half(), None)


@pytest.mark.parametrize("rows", [1, DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, 40, 700])
def test_linear_routes_every_row_count_to_a_correct_product(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    linear = Linear(w, b)
    assert linear.plain and linear.weight.dtype == torch.float32  # one plain copy for kernel and oneDNN
    x = torch.randn(rows, 64, generator=gen)
    assert float((linear(x).double() - _float64(x, w, b)).abs().max()) <= 1e-4


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            mapping = int(span[1], 16) <= address < int(span[2], 16)
        elif mapping and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_huge_page_copy_keeps_values_and_gets_2mib_pages_where_thp_allows():
    gen = torch.Generator().manual_seed(9)
    small = torch.randn(64, 64, generator=gen)
    assert torch.equal(huge_page_copy(small), small)
    big = torch.randn(3 * MIN_BYTES // 4 // 1024, 1024, generator=gen)  # 3× MIN_BYTES of fp32
    for _ in range(3):  # large frees raise glibc's mmap threshold: later big tensors come from the touched heap
        freed = torch.ones(30 << 20 >> 2)
        del freed
    copy = huge_page_copy(big)
    assert torch.equal(copy, big) and copy.is_contiguous() and copy.data_ptr() % HUGE_PAGE == 0
    assert copy.data_ptr() != big.data_ptr()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert "[never]" in mode or _anon_huge_kib(copy.data_ptr()) >= HUGE_PAGE // 1024, mode
