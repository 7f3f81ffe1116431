"""GPT-OSS language models (InternVL3.5-GPT-OSS) on the CPU engine against transformers' GptOss (the reference).

The tiny `gpt_oss` checkpoint (build/checkpoint.py) has 8 experts, top-2, expert and router biases,
attention sinks, layer 0 sliding (window 64) and layer 1 full, YaRN rotary and the
`internvl3_5_gpt_oss` template. Prompts longer than the window (every image prompt, and the
150/300-token text prompts here) exercise the window; the ablation tests show the sinks and the
window each change the reference's tokens, so a model without them cannot pass.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import GptOssConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from build.checkpoint import generate
from build.convert import convert
from engine.config import ConfigError, ModelConfig
from engine.llm.model import DecoderLM
from engine.llm.moe import SparseMoE
from engine.llm.rope import inverse_frequencies
from engine.sampling_params import SamplingParams
from engine.text_config import text_config
from engine.tokenizer import TextTokenizer
from tests import reference_chat, reference_preprocess
from tests.pipelines import pipelines  # noqa: F401
from tests.test_generation import CASES, IMAGES, MAX_NEW, MIN_MARGIN, _reference
from tests.test_llm_engine import (
    Setup,
    check_chunked_batched_logits,
    check_in_flight_batch_of_four,
    load_setup,
    prompt_with_table,
    reference_generate,
    reference_generate_with_table,
    run_alone,
    text_ids,
    tokens_of,
)

TEMPLATE = "internvl3_5_gpt_oss"
# The template's default system message (OpenGVLab/InternVL internvl_chat_gpt_oss/.../conversation.py)
SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
LONG = 150  # tokens: beyond the tiny checkpoint's window of 64


@pytest.fixture(scope="module")
def path(checkpoints):
    return checkpoints["gpt_oss"]


@pytest.fixture(scope="module")
def oss(path) -> Setup:
    return load_setup(path)


def test_the_tiny_checkpoint_has_the_gpt_oss_structure(oss):
    text, ref_config = oss.cfg.text, oss.ref.config.text_config
    assert (text.model_type, text.num_experts, text.num_experts_per_tok) == ("gpt_oss", 8, 2)
    assert text.sparse_layers == (0, 1) and text.attention_sinks and text.attention_bias
    assert [i for i, t in enumerate(ref_config.layer_types) if t == "sliding_attention"] == list(text.sliding_layers) == [0]
    assert text.sliding_window == ref_config.sliding_window == 64
    assert text.yarn is not None and (text.swiglu_limit, text.swiglu_alpha) == (7.0, 1.702)
    assert oss.cfg.template.name == TEMPLATE and oss.cfg.template.stop_token == "<|return|>"
    assert not oss.cfg.skip_special_tokens


# ------------------------------------------------------------------ parts against transformers


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),  # Qwen3 long-context style
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, attention_factor=0.9, beta_fast=16),
        dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=0.5),
        dict(rope_type="default"),
    ],
)
def test_rotary_frequencies_and_scale_equal_transformers(rope):
    config = GptOssConfig(num_hidden_layers=2, head_dim=64, rope_parameters=dict(rope, rope_theta=150000.0))
    expected_freq, expected_scale = (
        ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu") if rope["rope_type"] != "default" else (None, 1.0)
    )
    text = text_config(config.to_dict(), "text_config")
    ours = inverse_frequencies(text)
    if expected_freq is None:
        expected_freq = 1.0 / (150000.0 ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(ours, expected_freq, rtol=1e-6, atol=0)
    assert (text.yarn.attention_factor if text.yarn else 1.0) == pytest.approx(expected_scale, rel=1e-12)


def test_expert_block_with_clamped_activations_equals_transformers(oss):
    ref = copy.deepcopy(oss.ref.model.language_model.layers[1].mlp)
    weights = {f"mlp.{k}": v.detach() for k, v in ref.state_dict().items()}
    ours = SparseMoE.from_gpt_oss_weights(weights.__getitem__, 2, 7.0, 1.702)
    x = torch.randn(61, oss.hidden, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        _, ref_scores, ref_experts = ref.router(x)
        expected, _ = ref(x[None])
        gate_up = x @ ref.experts.gate_up_proj[0] + ref.experts.gate_up_proj_bias[0]
    assert bool((gate_up[:, ::2] > 7.0).any()) and bool((gate_up[:, 1::2].abs() > 7.0).any())  # the clamps bite
    weights_, experts = ours.route(x)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights_, ref_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours(x), expected[0], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ greedy parity


def test_greedy_tokens_equal_transformers_generate_also_beyond_the_window(oss):
    rng = np.random.default_rng(1)
    for length, n in [(1, 8), (9, 12), (37, 10), (LONG, 30)]:
        ids = text_ids(rng, length)
        ours = tokens_of(run_alone(oss, ids, SamplingParams(max_new_tokens=n)))
        assert ours == reference_generate(oss, ids, n), length
        assert len(set(ours)) > 1


@pytest.mark.parametrize("max_num_tokens", [16, 2048])
def test_long_prompt_with_chunked_prefill_equals_transformers_generate(max_num_tokens, oss):
    """Chunks of 16 start inside and beyond the window of earlier chunks."""
    ids = text_ids(np.random.default_rng(2), 300)
    assert tokens_of(run_alone(oss, ids, SamplingParams(max_new_tokens=10), max_num_tokens=max_num_tokens)) == reference_generate(oss, ids, 10)


def _without(oss, **layer_edits) -> Setup:
    model = copy.copy(oss.model)
    model.layers = [dict(layer, **layer_edits) for layer in oss.model.layers]
    return Setup(oss.path, oss.cfg, model, oss.ref)


@pytest.mark.parametrize("edit", [dict(sinks=None), dict(window=0)], ids=["no sinks", "no window"])
def test_sinks_and_window_each_change_the_reference_tokens(edit, oss):
    """Guards the parity tests: the same decoder without sinks, or without the window, misses them."""
    ids = text_ids(np.random.default_rng(3), LONG)
    expected = reference_generate(oss, ids, 12)
    assert tokens_of(run_alone(oss, ids, SamplingParams(max_new_tokens=12))) == expected
    assert tokens_of(run_alone(_without(oss, **edit), ids, SamplingParams(max_new_tokens=12))) != expected


def test_prompt_table_rows_match_reference_fed_inputs_embeds(oss):
    rng = np.random.default_rng(4)
    ids, table = prompt_with_table(oss, rng, rows=8)
    expected = reference_generate_with_table(oss, ids, table, 10)
    assert tokens_of(run_alone(oss, ids, SamplingParams(max_new_tokens=10), table)) == expected
    assert tokens_of(run_alone(oss, ids, SamplingParams(max_new_tokens=10), table, max_num_tokens=5)) == expected


def test_chunked_batched_forward_logits_match_reference_logits(oss):
    check_chunked_batched_logits(oss, np.random.default_rng(5))


def test_in_flight_batch_of_four_different_requests_gives_each_its_solo_tokens(oss):
    check_in_flight_batch_of_four(oss, np.random.default_rng(11), long_prompt=LONG)  # the long one beyond the window


# ------------------------------------------------------------------ the whole pipeline (model.chat semantics)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_matches_the_gpt_oss_chat_reference(pipelines, path, case):
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference(path, question, keys, max_tiles, template=TEMPLATE, system=SYSTEM)
    assert margin > MIN_MARGIN
    result = pipelines(path, "torch").generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected and result.question == expected_question
    assert result.text == reference_chat.reply(path, expected, "<|return|>", skip_special_tokens=False)


def test_pipeline_second_turn_matches_the_reference(pipelines, path):
    pipe = pipelines(path, "onnxruntime")
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat("<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, max_tiles=4, return_history=True)
    result = pipe.generate("Which one is brighter?", images, history=history, max_new_tokens=MAX_NEW, max_tiles=4)
    tiles = [reference_preprocess.load_image(io.BytesIO(b), max_num=4).numpy() for b in images]
    query, _ = reference_chat.chat_query(TEMPLATE, SYSTEM, "Which one is brighter?", [len(t) for t in tiles], history)
    expected, margin = reference_chat.generate(path, query, np.concatenate(tiles), pipe.config.stop_token_id, MAX_NEW)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected


def test_reference_reply_depends_on_image_and_prompt(pipelines, path):
    question = CASES["one_image"][0]
    a = _reference(path, question, ("a",), 12, template=TEMPLATE, system=SYSTEM)[0]
    assert a != _reference(path, question, ("c",), 12, template=TEMPLATE, system=SYSTEM)[0]
    stop = pipelines(path, "torch").config.stop_token_id
    replies = []
    for q in ("Hello, who are you?", "What color is the sky?"):
        query, _ = reference_chat.chat_query(TEMPLATE, "Be brief.", q, [])
        replies.append(reference_chat.generate(path, query, None, stop, MAX_NEW)[0])
    assert replies[0] != replies[1]


def test_replies_keep_the_harmony_markers_as_chat_decodes_them(pipelines, path):
    """InternVL3.5-GPT-OSS's chat() decodes with skip_special_tokens=False: `<|channel|>final<|message|>`
    stays in the reply; other templates drop special tokens."""
    hf = reference_chat.tokenizer(path)
    ids = hf.convert_tokens_to_ids(["<|channel|>"]) + hf("final").input_ids + hf.convert_tokens_to_ids(["<|message|>"]) + hf(" Blue sky.").input_ids
    pipe = pipelines(path, "torch")
    assert pipe.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=False) == "<|channel|>final<|message|> Blue sky."
    assert TextTokenizer(path).decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_custom_format_checkpoint_answers_as_its_conversion_through_transformers(pipelines, path, tmp_path):
    """InternVL3.5-GPT-OSS ships in the custom layout (llm_config model_type gpt_oss, rope_scaling yarn):
    served directly, it answers as transformers answers on its build.convert output (fused experts kept)."""
    custom = generate("tiny", "gpt_oss", tmp_path / "custom", fmt="custom")
    assert json.loads((custom / "config.json").read_text())["llm_config"]["rope_scaling"]["rope_type"] == "yarn"
    assert ModelConfig.from_pretrained(custom).text == ModelConfig.from_pretrained(path).text
    converted = convert(custom, tmp_path / "hf")
    for case in ("one_image", "two_images"):
        question, keys, max_tiles = CASES[case]
        expected, margin, _ = _reference(converted, question, keys, max_tiles, template=TEMPLATE, system=SYSTEM)
        assert margin > MIN_MARGIN
        result = pipelines(custom, "torch").generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
        assert result.token_ids == expected, case


# ------------------------------------------------------------------ config


def _edited(src, dst, edit):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config = json.loads((dst / "config.json").read_text())
    edit(config["text_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_defaults_follow_gpt_oss_config(path, tmp_path):
    """Absent layer_types / rope / swiglu fields take GptOssConfig's defaults (even layers sliding, YaRN)."""

    def edit(tc):
        for name in ("layer_types", "rope_parameters", "swiglu_limit", "swiglu_alpha"):
            tc.pop(name)
        tc["num_hidden_layers"] = 4

    text = ModelConfig.from_pretrained(_edited(path, tmp_path, edit)).text
    ref = GptOssConfig(num_hidden_layers=4)
    assert text.sliding_layers == tuple(i for i, t in enumerate(ref.layer_types) if t == "sliding_attention") == (0, 2)
    assert text.rope_theta == ref.rope_parameters["rope_theta"] and text.yarn.factor == ref.rope_parameters["factor"]
    assert (text.swiglu_limit, text.swiglu_alpha) == (ref.swiglu_limit, ref.swiglu_alpha)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda tc: tc.update(num_experts_per_tok=9), "num_experts_per_tok"),
        (lambda tc: tc.pop("num_local_experts"), "num_local_experts"),
        (lambda tc: tc.update(sliding_window=0), "sliding_window"),
        (lambda tc: tc.update(layer_types=["full_attention"]), "layer_types"),
        (lambda tc: tc.update(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
        (lambda tc: tc.update(swiglu_limit=-1), "swiglu_limit"),
        (lambda tc: tc["rope_parameters"].pop("original_max_position_embeddings"), "original_max_position_embeddings"),
        (lambda tc: tc["rope_parameters"].update(rope_type="longrope"), "rope type"),
        (lambda tc: tc.update(quantization_config={"quant_method": "mxfp4"}), "quantization_config"),
    ],
)
def test_malformed_gpt_oss_field_is_refused_at_load_naming_it(edit, field, path, tmp_path):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_pretrained(_edited(path, tmp_path, edit))


def test_engine_state_is_the_config(oss):
    """The decoder's per-layer window and sinks come from the config, not from constants."""
    text = dataclasses.replace(oss.cfg.text, sliding_layers=(0, 1))
    model = DecoderLM.from_pretrained(oss.path, text)
    assert [layer["window"] for layer in model.layers] == [64, 64]
    assert all(layer["sinks"].shape == (text.num_heads,) for layer in model.layers)
