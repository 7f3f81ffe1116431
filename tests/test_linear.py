"""engine.llm.linear.Linear (oneDNN-packed weight) against F.linear on the plain weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.llm.linear import Linear, onednn_packing_available


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_matches_f_linear(rows, with_bias):
    gen = torch.Generator().manual_seed(rows * 2 + with_bias)
    weight = torch.randn(96, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    x = torch.randn(rows, 64, generator=gen)
    linear = Linear(weight, bias)
    assert linear.packed == onednn_packing_available(torch.float32)
    torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert linear.nbytes == weight.numel() * 4 + (96 * 4 if with_bias else 0)


def test_unpacked_dtypes_fall_back_to_f_linear():
    weight = torch.randn(32, 16, dtype=torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    linear = Linear(weight)
    assert not linear.packed
    assert torch.equal(linear(x), F.linear(x, weight))
