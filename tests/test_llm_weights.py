"""llm_weights="float16" and "int8" (engine/llm/precision.py) against the fp32 engine on the tiny
checkpoints.

Bounds on logits (max |logit change| / max |fp32 logit|), activations and accumulation fp32 in both:
- float16: each stored weight is rounded to float16, a relative change of at most u = 2^-11 (fp16's
  unit roundoff); a logit moves by roughly u times the size of the terms that make it, accumulated
  over the layers. Largest measured on the tiny checkpoints (2 layers, 2026-12-07): 1.05·u (gpt_oss,
  5.1e-4); gate 4·u.
- int8: a weight row is stored in steps of max|row| / 127, so each weight moves by at most 1/254 of
  its row's largest (engine/llm/int8.py) — r = 1/254, a bound relative to the row, not the weight.
  Largest measured (2026-12-07): 0.024 · max|logit| (gpt_oss; qwen3_moe 0.017, dense ≈ 0.009-0.010);
  gate 8·r (≈ 0.031).
Greedy tokens must equal the fp32 engine's wherever the fp32 top-1/top-2 margin exceeds twice the
bound, which the test asserts of its prompts (margin-controlled: the checkpoints are built with wide
margins, tests/test_generation.py MIN_MARGIN).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.llm.linear import Linear
from engine.llm.model import DecoderLM, SequenceInput
from engine.llm.precision import FP16_MAX, check_llm_weights
from engine.weights import load_weights
from tests.test_generation import MIN_MARGIN
from tests.test_llm_engine import check_in_flight_batch_of_four, load_setup, text_ids

FAMILIES = ("qwen3", "qwen2", "llama", "qwen3_moe", "gpt_oss")
U = 2.0**-11  # float16 unit roundoff
BOUNDS = {"float16": 4 * U, "int8": 8 / 254}  # max |logit change| / max |fp32 logit|
MODES = tuple(BOUNDS)


@pytest.fixture(scope="module")
def models(checkpoints):
    cache = {}

    def get(family: str, mode: str = "float16") -> tuple[DecoderLM, DecoderLM]:
        if (family, mode) not in cache:
            path = checkpoints[family]
            text = ModelConfig.from_pretrained(path).text
            if family not in cache:
                cache[family] = DecoderLM.from_pretrained(path, text)
            cache[family, mode] = cache[family], DecoderLM.from_pretrained(path, text, llm_weights=mode)
            assert cache[family, mode][1].llm_weights == mode  # the int8 kernel built: no float16 fallback
        return cache[family, mode]

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
    linear = Linear(weight, bias, precision="float16")
    expected = F.linear(x.double(), weight.half().double(), None if bias is None else bias.double())
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 accumulation
    assert linear(x).dtype == torch.float32
    assert linear.nbytes == weight.numel() * 2 + (96 * 4 if with_bias else 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_stay_within_the_bound_of_the_fp32_engine(family, mode, models):
    m32, reduced = models(family, mode)
    rng = np.random.default_rng(FAMILIES.index(family))
    prompts = [torch.as_tensor(text_ids(rng, n), dtype=torch.long) for n in (1, 9, 40, 90)]
    a, b = _logits(m32, prompts), _logits(reduced, prompts)
    assert (a - b).abs().max() <= BOUNDS[mode] * a.abs().max()
    assert not torch.equal(a, b)  # the reduced weights are really in use


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
def test_fp16_greedy_tokens_equal_the_fp32_engine_on_margin_controlled_prompts(family, models):
    m32, m16 = models(family, "float16")
    rng = np.random.default_rng(10 + FAMILIES.index(family))
    checked = 0
    for n in (3, 17, 50, 5, 29, 11, 40, 2, 23, 64):  # candidates; the first 3 with wide margins are checked
        ids = torch.as_tensor(text_ids(rng, n), dtype=torch.long)
        tokens, margins = _greedy_with_margins(m32, ids, 12)
        scale = float(_logits(m32, [ids]).abs().max())
        if min(margins) <= 2 * BOUNDS["float16"] * scale:  # the bound could not rule out a flip here
            continue
        assert _greedy_with_margins(m16, ids, 12)[0] == tokens
        checked += 1
        if checked == 3:
            break
    assert checked == 3, "too few prompts with margins above twice the bound"


# The int8 bound (8/254 of max|logit|) is wider than any top-1/top-2 margin of the tiny random
# checkpoints, so int8 greedy tokens are checked on int8-grid copies instead: every matrix the int8
# engine quantizes is first rounded, here, onto its own per-row int8 grid (scale max|row| / 127), so
# quantizing it again is lossless and the int8 engine must give the fp32 engine's (and transformers')
# tokens exactly, up to fp32 summation order — a check of the kernel, the scales, the int8 embedding
# rows, the MoE experts and the in-flight batch, with the quantization error itself gated above.
GRID_IN_AXIS = {"mlp.experts.gate_up_proj": 1, "mlp.experts.down_proj": 1}  # gpt_oss [E, in, out]
KEPT_FP32 = ("norm.weight", "mlp.gate.weight", "mlp.router.weight")


def _snap_to_int8_grid(name: str, w: np.ndarray) -> np.ndarray:
    axis = next((a for key, a in GRID_IN_AXIS.items() if name.endswith(key)), w.ndim - 1)
    scale = np.abs(w).max(axis=axis, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.round(w / scale) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def int8_grid(checkpoints, tmp_path_factory):
    from safetensors.numpy import load_file, save_file

    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(f"int8-grid-{family}") / "checkpoint"
            shutil.copytree(checkpoints[family], out)
            snapped = 0
            for file in out.glob("*.safetensors"):
                tensors = load_file(file)
                for name, w in tensors.items():
                    if name.startswith("language_model.") and w.ndim >= 2 and not name.endswith(KEPT_FP32):
                        tensors[name] = _snap_to_int8_grid(name, w)
                        snapped += 1
                save_file(tensors, file, metadata={"format": "pt"})
            assert snapped
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_greedy_tokens_equal_the_fp32_engine_on_int8_grid_checkpoints(family, int8_grid):
    path = int8_grid(family)
    text = ModelConfig.from_pretrained(path).text
    m32, m8 = DecoderLM.from_pretrained(path, text), DecoderLM.from_pretrained(path, text, llm_weights="int8")
    assert m8.llm_weights == "int8"
    rng = np.random.default_rng(10 + FAMILIES.index(family))
    replies = []
    for n in (3, 17, 50, 5, 29):
        ids = torch.as_tensor(text_ids(rng, n), dtype=torch.long)
        tokens, margins = _greedy_with_margins(m32, ids, 12)
        reply, _ = _greedy_with_margins(m8, ids, 12)
        # tokens up to the first margin too narrow for fp32 summation order (MIN_MARGIN) must agree
        safe = next((i for i, m in enumerate(margins) if m <= MIN_MARGIN), len(margins))
        assert reply[: safe + 1] == tokens[: safe + 1]
        replies.append((safe, tuple(tokens)))
    assert sum(safe for safe, _ in replies) >= 30 and len({t for _, t in replies}) == len(replies)  # prompts matter


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gpt_oss"])
def test_in_flight_batch_of_four_gives_each_request_its_solo_tokens(family, checkpoints, models, int8_grid):
    for mode, path in (("float16", checkpoints[family]), ("int8", int8_grid(family))):
        setup = load_setup(path)  # the reference stays transformers in fp32
        model = models(family, mode)[1] if mode == "float16" else DecoderLM.from_pretrained(path, setup.cfg.text, llm_weights=mode)
        setup = dataclasses.replace(setup, model=model)
        assert max(check_in_flight_batch_of_four(setup, np.random.default_rng(7), long_prompt=45)) == 4


def test_weights_are_stored_once_in_fp16_with_fp32_norms_and_routers(models):
    _, m16 = models("qwen3_moe")
    assert m16.embed.dtype == torch.float16 and m16.final_norm.dtype == torch.float32
    dense, sparse = m16.layers[0], m16.layers[1]
    assert all(dense[name].precision == "float16" for name in ("qkv", "o", "gate_up", "down"))
    assert dense["in_norm"].dtype == torch.float32 and dense["q_norm"].dtype == torch.float32
    assert all(e.precision == "float16" for e in sparse["moe"].gate_up + sparse["moe"].down)
    assert sparse["moe"].router.precision == "float32" and m16.lm_head.precision == "float16"


def test_int8_weights_are_stored_once_with_fp32_norms_and_routers(models, checkpoints):
    _, m8 = models("qwen3_moe", "int8")
    dense, sparse = m8.layers[0], m8.layers[1]
    assert all(dense[name].int8.rows.packed.dtype == torch.int8 for name in ("qkv", "o", "gate_up", "down"))
    assert all(e.precision == "int8" for e in sparse["moe"].gate_up + sparse["moe"].down)
    assert sparse["moe"].router.precision == "float32" and dense["in_norm"].dtype == torch.float32
    head = m8.lm_head.int8
    assert not m8.tied_embeddings and m8.embed.packed.dtype == torch.int8 and m8.embed is not head.rows
    assert m8.lm_head.nbytes == head.out_features * head.in_features + 4 * head.out_features
    path = checkpoints["qwen3"]  # tied: the embedding table is the LM head's rows, stored once
    tied = DecoderLM(ModelConfig.from_pretrained(path).text, load_weights(path, "language_model."), None, llm_weights="int8")
    assert tied.tied_embeddings and tied.embed is tied.lm_head.int8.rows


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
    assert DecoderLM(text, weights, None, llm_weights="float16").layers[0]["o"].precision == "float16"


@pytest.mark.parametrize(
    "llm_weights, dtype, message",
    [("int4", torch.float32, "one of"), ("bfloat16", torch.float32, "one of"), ("float16", torch.bfloat16, "fp32 activations"), ("int8", torch.bfloat16, "fp32 activations")],
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
    with pytest.raises(ValueError, match="one of"):
        BuildSettings(llm_weights="int4")


def test_pipeline_passes_llm_weights_to_the_decoder(checkpoints):
    from engine.pipeline import Pipeline

    with Pipeline.from_pretrained(checkpoints["qwen3"], vision_backend="torch", llm_weights="float16") as pipe:
        assert pipe.llm.model.llm_weights == "float16" and pipe.llm.model.lm_head.precision == "float16"
