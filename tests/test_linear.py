"""engine.llm.linear.Linear against F.linear on the plain weight: fp32 weights through the compiled
decode kernel + oneDNN on the plain weight, or (without the kernels) oneDNN on a prepacked weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.llm import cpu_ops, linear as linear_module
from engine.llm.linear import BLOCK_ROWS, EXACT_ROWS, Linear, onednn_packing_available, padded_rows


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 300, BLOCK_ROWS + 1, 2 * BLOCK_ROWS + 77])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "no-kernels"])
def test_linear_matches_f_linear(rows, with_bias, kernels, monkeypatch):
    if not kernels:  # a machine where engine/llm/csrc did not build
        monkeypatch.setattr(linear_module.cpu_ops, "load", lambda: (None, "not built"))
    else:
        assert cpu_ops.load()[0] is not None  # CI machines have gcc and AVX2
    gen = torch.Generator().manual_seed(rows * 2 + with_bias)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(rows, 64, generator=gen)
    linear = Linear(weight, bias)
    assert linear.plain == kernels  # one plain fp32 copy for the kernel and oneDNN
    assert linear.packed == (onednn_packing_available(torch.float32) and not kernels)
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert linear.nbytes == weight.numel() * 4 + (96 * 4 if with_bias else 0)


def test_unpacked_dtypes_fall_back_to_f_linear():
    weight = torch.randn(32, 16, dtype=torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    linear = Linear(weight)
    assert not linear.packed
    assert torch.equal(linear(x), F.linear(x, weight))


def test_padded_rows_few_shapes_little_waste():
    # oneDNN caches one primitive per row count: the padded counts must be few and close to n
    sizes = [padded_rows(n) for n in range(1, BLOCK_ROWS + 1)]
    assert all(n <= p <= n * 1.125 for n, p in zip(range(1, BLOCK_ROWS + 1), sizes))
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    assert len(set(sizes)) <= EXACT_ROWS + 8 * 5  # 16 exact, then 8 per power of two up to 512
