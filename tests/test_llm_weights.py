"""llm_weights="float16" (engine/llm/precision.py) against the fp32 engine on the tiny checkpoints.

Bound on logits: each stored weight is rounded to float16, a relative change of at most
u = 2^-11 (fp16's unit roundoff); activations and accumulation stay fp32, so a logit moves by
roughly u times the size of the terms that make it, accumulated over the layers. On the tiny
checkpoints (2 layers) the largest change measured was 0.6·u·max|logit| (≈0.012 at logits of ≈20);
the gate is 4·u·max|logit| (≈0.04). Greedy tokens must equal the fp32 engine's wherever the fp32
top-1/top-2 margin exceeds twice that bound, which the test asserts of its prompts (margin-controlled:
the checkpoints are built with wide margins, tests/test_generation.py MIN_MARGIN).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.llm.linear import Linear
from engine.llm.model import DecoderLM, SequenceInput
from engine.llm.precision import FP16_MAX, check_llm_weights
from engine.weights import load_weights
from tests.test_llm_engine import check_in_flight_batch_of_four, load_setup, text_ids

FAMILIES = ("qwen3", "qwen2", "llama", "qwen3_moe", "gpt_oss")
U = 2.0**-11  # float16 unit roundoff
BOUND = 4 * U  # max |logit change| / max |fp32 logit|


@pytest.fixture(scope="module")
def models(checkpoints):
    cache = {}

    def get(family: str) -> tuple[DecoderLM, DecoderLM]:
        if family not in cache:
            path = checkpoints[family]
            text = ModelConfig.from_pretrained(path).text
            cache[family] = DecoderLM.from_pretrained(path, text), DecoderLM.from_pretrained(path, text, llm_weights="float16")
        return cache[family]

    return get


def _logits(model: DecoderLM, prompts: list[torch.Tensor]) -> torch.Tensor:
    # prompts run together as one in-flight step -> [B, vocab]
    return model.forward([SequenceInput(p, 0, model.new_cache(len(p) + 1), None) for p in prompts])


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_half_linear_is_the_fp32_product_of_the_rounded_weight(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(96, 64, generator=gen), torch.randn(rows, 64, generator=gen)
    bias = torch.randn(96, generator=gen) if with_bias else None
    linear = Linear(weight, bias, half=True)
    expected = F.linear(x.double(), weight.half().double(), None if bias is None else bias.double())
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 accumulation
    assert linear(x).dtype == torch.float32
    assert linear.nbytes == weight.numel() * 2 + (96 * 4 if with_bias else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_logits_stay_within_the_bound_of_the_fp32_engine(family, models):
    m32, m16 = models(family)
    rng = np.random.default_rng(FAMILIES.index(family))
    prompts = [torch.as_tensor(text_ids(rng, n), dtype=torch.long) for n in (1, 9, 40, 90)]
    a, b = _logits(m32, prompts), _logits(m16, prompts)
    assert (a - b).abs().max() <= BOUND * a.abs().max()
    assert not torch.equal(a, b)  # the fp16 weights are really in use


def _greedy_with_margins(model: DecoderLM, ids: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    cache = model.new_cache(len(ids) + n)
    tokens, margins, start, new = [], [], 0, ids
    for _ in range(n):
        logits = model.forward([SequenceInput(new, start, cache, None)])[0]
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        start, new = start + len(new), torch.tensor(tokens[-1:])
    return tokens, margins


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_the_fp32_engine_on_margin_controlled_prompts(family, models):
    m32, m16 = models(family)
    rng = np.random.default_rng(10 + FAMILIES.index(family))
    checked = 0
    for n in (3, 17, 50, 5, 29, 11, 40, 2, 23, 64):  # candidates; the first 3 with wide margins are checked
        ids = torch.as_tensor(text_ids(rng, n), dtype=torch.long)
        tokens, margins = _greedy_with_margins(m32, ids, 12)
        scale = float(_logits(m32, [ids]).abs().max())
        if min(margins) <= 2 * BOUND * scale:  # the bound could not rule out a flip here
            continue
        assert _greedy_with_margins(m16, ids, 12)[0] == tokens
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "too few prompts with margins above twice the bound"


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gpt_oss"])
def test_in_flight_batch_of_four_gives_each_fp16_request_its_solo_tokens(family, checkpoints, models):
    setup = load_setup(checkpoints[family])  # the reference stays transformers in fp32
    setup = dataclasses.replace(setup, model=models(family)[1])
    assert max(check_in_flight_batch_of_four(setup, np.random.default_rng(7), long_prompt=45)) == 4


def test_weights_are_stored_once_in_fp16_with_fp32_norms_and_routers(models):
    _, m16 = models("qwen3_moe")
    assert m16.embed.dtype == torch.float16 and m16.final_norm.dtype == torch.float32
    dense, sparse = m16.layers[0], m16.layers[1]
    assert all(dense[name].half for name in ("qkv", "o", "gate_up", "down"))
    assert dense["in_norm"].dtype == torch.float32 and dense["q_norm"].dtype == torch.float32
    assert all(e.half for e in sparse["moe"].gate_up + sparse["moe"].down)
    assert not sparse["moe"].router.half and m16.lm_head.half


@pytest.mark.parametrize("value", [FP16_MAX * 1.01, float("inf"), float("nan")])
def test_a_weight_beyond_fp16_range_is_refused_naming_the_tensor(value, checkpoints):
    path = checkpoints["qwen3"]
    text = ModelConfig.from_pretrained(path).text
    weights = load_weights(path, "language_model.")
    weights["layers.1.mlp.down_proj.weight"][3, 5] = -value
    with pytest.raises(ValueError, match=r"language_model\.layers\.1\.mlp\.down_proj\.weight .*float16's range"):
        DecoderLM(text, weights, None, llm_weights="float16")
    DecoderLM(text, weights, None)  # fp32 keeps it


def test_fp16_limit_itself_is_accepted(checkpoints):
    path = checkpoints["qwen3"]
    text = ModelConfig.from_pretrained(path).text
    weights = load_weights(path, "language_model.")
    weights["layers.0.self_attn.o_proj.weight"][0, 0] = FP16_MAX
    assert DecoderLM(text, weights, None, llm_weights="float16").layers[0]["o"].half


@pytest.mark.parametrize(
    "llm_weights, dtype, message",
    [("int8", torch.float32, "int8 is not supported yet"), ("bfloat16", torch.float32, "one of"), ("float16", torch.bfloat16, "fp32 activations")],
)
def test_other_precisions_are_refused(llm_weights, dtype, message):
    with pytest.raises(ValueError, match=message):
        check_llm_weights(llm_weights, dtype)


# ------------------------------------------------------------------ configuration


def test_the_build_setting_reaches_the_llm_model_with_the_engine_choices(checkpoints, tmp_path):
    from build.repository import common_values, write_repository
    from build.settings import LLM_WEIGHTS, BuildSettings
    from engine.llm.precision import LLM_WEIGHTS as ENGINE_CHOICES

    assert LLM_WEIGHTS == ENGINE_CHOICES and BuildSettings().llm_weights == "float32"
    values = common_values(ModelConfig.from_pretrained(checkpoints["qwen3"]), BuildSettings(llm_weights="float16"))
    write_repository(tmp_path, "cpu", {**values, "onnx_file": str(tmp_path / "vision_encoder.onnx")})
    assert 'key: "llm_weights" value: { string_value: "float16" }' in (tmp_path / "llm" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="int8 is not supported yet"):
        BuildSettings(llm_weights="int8")


def test_pipeline_passes_llm_weights_to_the_decoder(checkpoints):
    from engine.pipeline import Pipeline

    with Pipeline.from_pretrained(checkpoints["qwen3"], vision_backend="torch", llm_weights="float16") as pipe:
        assert pipe.llm.model.llm_weights == "float16" and pipe.llm.model.lm_head.half
