"""engine/llm/int8.py: per-row int8 quantization and the AVX2 kernel against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.llm import cpu_ops
from engine.llm.int8 import KERNEL_MAX_ROWS, Int8Rows, Int8Weight, quantize_rows


def _reference(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    # the float64 product of the dequantized weight, written without engine code
    w = weight.rows.block(0, weight.out_features).double() * weight.rows.scale.double()[:, None]
    return F.linear(x.double(), w, None if weight.bias is None else weight.bias.double())


def test_the_kernel_builds_on_this_machine():
    module, reason = cpu_ops.load()
    assert module is not None, reason  # CI machines have gcc and AVX2: int8 must not silently fall back


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 16, KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("out_features, in_features", [(1, 16), (7, 19), (300, 64), (1030, 1027)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_matches_the_dequantized_weight_in_float64(rows, out_features, in_features, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = Int8Weight(torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen) if with_bias else None)
    x = torch.randn(rows, in_features, generator=gen)
    got = weight(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    expected = _reference(x, weight)
    # fp32 accumulation of in_features products, each |x·w| up to ~|x|·max|w|
    tolerance = 1e-5 * in_features**0.5 * float(expected.abs().max().clamp(min=1))
    assert float((got.double() - expected).abs().max()) <= tolerance


def test_strided_input_and_thread_count_do_not_change_the_result():
    gen = torch.Generator().manual_seed(5)
    weight = Int8Weight(torch.randn(257, 96, generator=gen), None)
    x = torch.randn(96, 6, generator=gen).t()  # [6, 96], not contiguous
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight(x)
        torch.set_num_threads(2)
        two = weight(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # output rows are split across threads, each sum is whole
    assert torch.equal(one, weight(x.contiguous()))


def test_quantization_rounds_each_row_to_its_own_grid():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50, 33, generator=gen) * torch.logspace(-3, 3, 50)[:, None]
    w[7] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    peak = w.abs().amax(dim=1)
    expected_scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    torch.testing.assert_close(scale, expected_scale, rtol=0, atol=0)
    assert int(q.abs().max()) == 127 and torch.equal(q.abs().amax(dim=1)[peak > 0], torch.full((49,), 127, dtype=torch.int8))
    error = (q.float() * scale[:, None] - w).abs()
    assert bool((error <= scale[:, None] * (0.5 + 1e-5)).all())  # half a step per weight, at most
    assert not q[7].any()


@pytest.mark.parametrize("shape", [(20, 8), (64, 48), (7, 33)])
def test_packed_rows_are_the_quantized_rows(shape):
    gen = torch.Generator().manual_seed(2)
    table = torch.randn(*shape, generator=gen)
    q, scale = quantize_rows(table)
    rows = Int8Rows.quantize(table)
    ids = torch.tensor([3, 3, shape[0] - 1, 0])
    assert torch.equal(rows.int8(ids), q[ids]) and torch.equal(rows.scale, scale)
    assert torch.equal(rows.block(4, shape[0]), q[4:]) and torch.equal(rows.block(0, 3), q[:3])
    torch.testing.assert_close(rows[ids], q[ids].float() * scale[ids, None])
    assert float((rows[ids] - table[ids]).abs().max()) <= float(table.abs().max()) / 254 * 1.001
    line = rows.packed[0, 0]  # one 64-byte line: 16 columns of rows 0-3
    assert torch.equal(line, F.pad(q, (0, 16 * rows.packed.shape[1] - shape[1]))[:4, :16])


def test_bad_inputs_get_a_clear_error():
    weight = Int8Weight(torch.randn(4, 16), None)
    with pytest.raises(RuntimeError, match="float32"):
        weight(torch.randn(1, 16, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="columns"):
        weight(torch.randn(1, 15))


def test_without_the_kernel_int8_serves_float16_with_a_warning(monkeypatch, checkpoints):
    from engine.config import ModelConfig
    from engine.llm.model import DecoderLM

    monkeypatch.setattr(cpu_ops, "load", lambda: (None, "no compiler here"))
    path = checkpoints["qwen3"]
    with pytest.warns(UserWarning, match=r"llm_weights='int8' unavailable \(no compiler here\); serving float16"):
        model = DecoderLM.from_pretrained(path, ModelConfig.from_pretrained(path).text, llm_weights="int8")
    assert model.llm_weights == "float16" and model.lm_head.precision == "float16"
    with pytest.raises(RuntimeError, match="no compiler here"):
        Int8Weight(torch.randn(4, 16), None)
