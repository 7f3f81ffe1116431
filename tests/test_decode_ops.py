"""engine/llm/csrc/decode_ops.cpp: the fused RMSNorm and q/k norm + rotary embedding against the same
arithmetic written as torch operators (transformers' Qwen3 RMSNorm and apply_rotary_pos_emb), and
the decoder with the kernels against the decoder without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.llm import cpu_ops
from engine.llm.model import DecoderLM, SequenceInput
from tests.test_llm_engine import text_ids

OPS = cpu_ops.load()[0]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' Qwen3RMSNorm.forward in fp32
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' apply_rotary_pos_emb for one of q / k: x [N, heads, d], cos / sin [N, 1, d]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_the_kernels_build_on_this_machine():
    assert OPS is not None, cpu_ops.load()[1]


@pytest.mark.parametrize("rows, hidden", [(1, 1024), (3, 128), (70, 96)])
def test_rms_norm_matches_the_torch_arithmetic(rows, hidden):
    gen = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, hidden, generator=gen) * 3, 1 + torch.randn(hidden, generator=gen) * 0.3
    got = OPS.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, _rms(x, weight, 1e-6), rtol=2e-6, atol=1e-6)  # only the sum's order differs
    assert torch.equal(OPS.rms_norm(x[:, ::1], weight, 1e-6), got)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_norm_rope_qk_matches_the_torch_arithmetic(rows, with_norm):
    heads, kv_heads, d = 4, 2, 32
    gen = torch.Generator().manual_seed(10 * rows + with_norm)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=gen)
    angles = torch.randn(rows, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)  # [N, d]
    q_norm, k_norm = (1 + torch.randn(d, generator=gen) * 0.3, 1 + torch.randn(d, generator=gen) * 0.3) if with_norm else (None, None)
    q = qkv[:, : heads * d].view(rows, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(rows, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].clone()
    if with_norm:
        q, k = _rms(q, q_norm, 1e-6), _rms(k, k_norm, 1e-6)
    expected_q, expected_k = _rope(q, cos[:, None], sin[:, None]), _rope(k, cos[:, None], sin[:, None])
    got = qkv.clone()
    OPS.norm_rope_qk_(got, cos, sin, q_norm, k_norm, heads, kv_heads, d, 1e-6)
    got_q, got_k = got[:, : heads * d].view(rows, heads, d), got[:, heads * d : (heads + kv_heads) * d].view(rows, kv_heads, d)
    if with_norm:
        torch.testing.assert_close(got_q, expected_q, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(got_k, expected_k, rtol=2e-6, atol=2e-6)
    else:  # the rotation alone: two roundings per element, as torch's mul and add
        assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    assert torch.equal(got[:, (heads + kv_heads) * d :], v)  # v untouched


@pytest.mark.parametrize("pos", [0, 1, 37])
def test_attend_decode_writes_the_cache_and_matches_grouped_attention(pos):
    layers, kv_heads, heads, capacity, d = 3, 2, 8, 40, 64
    gen = torch.Generator().manual_seed(pos)
    cache_k, cache_v = torch.randn(layers, kv_heads, capacity, d, generator=gen), torch.randn(layers, kv_heads, capacity, d, generator=gen)
    q, k, v = torch.randn(heads, d, generator=gen), torch.randn(kv_heads, d, generator=gen), torch.randn(kv_heads, d, generator=gen)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    out = OPS.attend_decode(q, k, v, cache_k, cache_v, 1, pos)
    before_k[1, :, pos], before_v[1, :, pos] = k, v
    assert torch.equal(cache_k, before_k) and torch.equal(cache_v, before_v)  # only row pos of layer 1 written
    keys = before_k[1, :, : pos + 1].repeat_interleave(heads // kv_heads, dim=0).double()  # [heads, pos+1, d]
    values = before_v[1, :, : pos + 1].repeat_interleave(heads // kv_heads, dim=0).double()
    probs = (torch.einsum("hd,hjd->hj", q.double(), keys) * d**-0.5).softmax(-1)
    torch.testing.assert_close(out.double(), torch.einsum("hj,hjd->hd", probs, values), rtol=1e-5, atol=1e-5)


def test_bad_shapes_get_a_clear_error():
    with pytest.raises(RuntimeError, match="columns"):
        OPS.norm_rope_qk_(torch.zeros(1, 100), torch.zeros(1, 8), torch.zeros(1, 8), None, None, 4, 2, 8, 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        OPS.rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-6)


@pytest.mark.parametrize("family", ["qwen3", "llama", "gpt_oss"])
def test_the_decoder_with_the_kernels_equals_the_decoder_without(family, checkpoints):
    path = checkpoints[family]
    text = ModelConfig.from_pretrained(path).text
    fused, plain = DecoderLM.from_pretrained(path, text), DecoderLM.from_pretrained(path, text)
    plain.ops = None
    assert fused.ops is not None
    rng = np.random.default_rng(3)
    prompts = [torch.as_tensor(text_ids(rng, n), dtype=torch.long) for n in (1, 7, 33)]

    def logits(model):
        return model.forward([SequenceInput(p, 0, model.new_cache(len(p) + 1), None) for p in prompts])

    a, b = logits(fused), logits(plain)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert not torch.equal(b[0], b[1])  # the prompts matter
    # decode steps of three sequences at once: one token each (the fused attention on dense layers)
    caches = {m: [m.new_cache(len(p) + 8) for p in prompts] for m in (fused, plain)}
    steps = {m: [SequenceInput(p, 0, cache, None) for p, cache in zip(prompts, caches[m])] for m in (fused, plain)}
    for _ in range(6):
        out = {m: m.forward(steps[m]) for m in (fused, plain)}
        torch.testing.assert_close(out[fused], out[plain], rtol=1e-5, atol=1e-5 * float(out[plain].abs().max()))
        tokens = out[plain].argmax(-1)
        for m in (fused, plain):
            steps[m] = [SequenceInput(tokens[i : i + 1], s.start + len(s.token_ids), s.cache, None) for i, s in enumerate(steps[m])]
