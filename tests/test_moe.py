"""Qwen3-MoE language models on the CPU engine against transformers' Qwen3-MoE (the reference).

The tiny `qwen3_moe` checkpoint (build/checkpoint.py) has 8 experts, top-2, normalised top-k
probabilities, layer 0 dense (mlp_only_layers) and layer 1 sparse, so both MLP paths run.
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
from safetensors.torch import save_file
from transformers import InternVLConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeDecoderLayer,
    Qwen3MoeSparseMoeBlock,
)

from engine.config import ConfigError, ModelConfig
from engine.llm.model import DecoderLM, SequenceInput
from engine.llm.moe import SparseMoE
from engine.sampling_params import SamplingParams
from engine.weights import load_weights
from tests import reference_chat, reference_preprocess
from tests.pipelines import pipelines  # noqa: F401
from tests.test_generation import (
    CASES,
    IMAGES,
    MAX_NEW,
    MIN_MARGIN,
    SHORT_SYSTEM,
    SYSTEM,
    _reference,
)
from tests.test_llm_engine import (
    Setup,
    check_chunked_batched_logits,
    check_in_flight_batch_of_four,
    check_stream_shape,
    load_setup,
    prompt_with_table,
    random_table,
    reference_generate,
    reference_generate_with_table,
    run_alone,
    text_ids,
    tokens_of,
)

SPARSE_LAYER = 1


@pytest.fixture(scope="module")
def moe_path(checkpoints):
    return checkpoints["qwen3_moe"]


@pytest.fixture(scope="module")
def moe(moe_path) -> Setup:
    return load_setup(moe_path)


def _ref_block(setup: Setup, layer: int) -> Qwen3MoeSparseMoeBlock:
    return setup.ref.model.language_model.layers[layer].mlp


def test_the_tiny_checkpoint_has_dense_and_sparse_layers(moe):
    text = moe.cfg.text
    assert (text.model_type, text.num_experts, text.num_experts_per_tok, text.norm_topk_prob) == ("qwen3_moe", 8, 2, True)
    assert text.sparse_layers == (SPARSE_LAYER,) and text.qk_norm
    assert isinstance(_ref_block(moe, SPARSE_LAYER), Qwen3MoeSparseMoeBlock)
    assert not isinstance(_ref_block(moe, 0), Qwen3MoeSparseMoeBlock)
    assert moe.model.layers[0]["moe"] is None and moe.model.layers[SPARSE_LAYER]["moe"] is not None


# ------------------------------------------------------------------ the sparse block


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_sparse_block_matches_transformers_block_and_router(norm_topk_prob, moe):
    ref = copy.deepcopy(_ref_block(moe, SPARSE_LAYER))
    ref.gate.norm_topk_prob = norm_topk_prob
    ours = SparseMoE(
        ref.gate.weight.detach(),
        list(ref.experts.gate_up_proj.detach()),
        list(ref.experts.down_proj.detach()),
        moe.cfg.text.num_experts_per_tok,
        norm_topk_prob,
    )
    x = torch.randn(57, moe.hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, ref_weights, ref_experts = ref.gate(x)
        expected = ref(x[None])[0]
    weights, experts = ours.route(x)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(57)) == norm_topk_prob
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)


def test_router_sends_the_tokens_of_one_step_to_several_experts(moe):
    """A router that sent every token to one expert (or ignored top-k) fails here, whatever the tokens."""
    rng = np.random.default_rng(6)
    prompts = [torch.as_tensor(text_ids(rng, n), dtype=torch.long) for n in (17, 1, 30)]
    moe.model.forward([SequenceInput(p, 0, moe.model.new_cache(len(p)), None) for p in prompts])
    counts = moe.model.layers[SPARSE_LAYER]["moe"].last_tokens_per_expert
    assert int(counts.sum()) == 48 * moe.cfg.text.num_experts_per_tok  # every token, k experts each
    assert int((counts > 0).sum()) >= 4  # 8 experts: most of them got tokens of this one step
    assert int(counts.max()) < 48  # no expert took every token


def test_fused_expert_layout_loads_as_the_per_expert_one(moe, tmp_path):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]);
    save_pretrained writes them per expert as the hub's checkpoints do. Both load to the same model."""
    state = {k: v.contiguous() for k, v in moe.ref.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    fused, saved = load_weights(tmp_path, "language_model."), load_weights(moe.path, "language_model.")
    assert fused.keys() == saved.keys()
    assert all(torch.equal(fused[k], saved[k]) for k in saved)
    prompt = torch.as_tensor(text_ids(np.random.default_rng(7), 12), dtype=torch.long)
    model = DecoderLM.from_pretrained(tmp_path, moe.cfg.text)
    a = model.forward([SequenceInput(prompt, 0, model.new_cache(12), None)])
    b = moe.model.forward([SequenceInput(prompt, 0, moe.model.new_cache(12), None)])
    assert torch.equal(a, b)


# ------------------------------------------------------------------ parity with transformers


def test_greedy_tokens_equal_transformers_generate(moe):
    rng = np.random.default_rng(1)
    for length, n in [(1, 8), (9, 12), (37, 10)]:
        ids = text_ids(rng, length)
        events = run_alone(moe, ids, SamplingParams(max_new_tokens=n))
        check_stream_shape(events, "length")
        assert tokens_of(events) == reference_generate(moe, ids, n), length
        assert len(set(tokens_of(events))) > 1


@pytest.mark.parametrize("max_num_tokens", [16, 2048])
def test_long_prompt_with_chunked_prefill_equals_transformers_generate(max_num_tokens, moe):
    ids = text_ids(np.random.default_rng(2), 300)
    ours = tokens_of(run_alone(moe, ids, SamplingParams(max_new_tokens=10), max_num_tokens=max_num_tokens))
    assert ours == reference_generate(moe, ids, 10)


def test_prompt_table_rows_match_reference_fed_inputs_embeds(moe):
    rng = np.random.default_rng(3)
    ids, table = prompt_with_table(moe, rng, rows=8)
    expected = reference_generate_with_table(moe, ids, table, 10)
    assert tokens_of(run_alone(moe, ids, SamplingParams(max_new_tokens=10), table)) == expected
    assert tokens_of(run_alone(moe, ids, SamplingParams(max_new_tokens=10), table, max_num_tokens=5)) == expected
    other = random_table(moe, rng, 8)
    assert tokens_of(run_alone(moe, ids, SamplingParams(max_new_tokens=10), other)) != expected


def test_chunked_batched_forward_logits_match_reference_logits(moe):
    """Two prompts in uneven chunks, sharing every forward (and so every routing), give the
    reference's logits at each chunk's last position."""
    check_chunked_batched_logits(moe, np.random.default_rng(4))


def test_norm_topk_prob_false_equals_transformers(moe):
    ref = copy.deepcopy(moe.ref)
    ref.model.language_model.layers[SPARSE_LAYER].mlp.gate.norm_topk_prob = False
    text = dataclasses.replace(moe.cfg.text, norm_topk_prob=False)
    setup = Setup(moe.path, moe.cfg, DecoderLM.from_pretrained(moe.path, text), ref)
    ids = text_ids(np.random.default_rng(9), 19)
    ours = tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=10)))
    assert ours == reference_generate(setup, ids, 10)
    assert ours != reference_generate(moe, ids, 10)  # the flag changes the model


def test_in_flight_batch_of_four_different_requests_gives_each_its_solo_tokens(moe):
    sizes = check_in_flight_batch_of_four(moe, np.random.default_rng(11), long_prompt=90)
    assert sum(s > 1 for s in sizes) >= 5


# ------------------------------------------------------------------ the whole pipeline


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_greedy_generate_matches_transformers(pipelines, moe_path, case):
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference(moe_path, question, keys, max_tiles)
    assert margin > MIN_MARGIN
    result = pipelines(moe_path, "torch").generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected
    assert result.question == expected_question


def test_pipeline_second_turn_matches_transformers(pipelines, moe_path):
    pipe = pipelines(moe_path, "torch")
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat("<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, max_tiles=4, return_history=True)
    result = pipe.generate("Which one is brighter?", images, history=history, max_new_tokens=MAX_NEW, max_tiles=4)
    tiles = [reference_preprocess.load_image(io.BytesIO(b), max_num=4).numpy() for b in images]
    query, _ = reference_chat.chat_query("internvl2_5", SYSTEM, "Which one is brighter?", [len(t) for t in tiles], history)
    expected, margin = reference_chat.generate(moe_path, query, np.concatenate(tiles), pipe.config.stop_token_id, MAX_NEW)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected


def test_reference_reply_depends_on_image_and_prompt(pipelines, moe_path):
    """Guards the parity tests: a checkpoint that ignored its image or prompt would match trivially."""
    question = CASES["one_image"][0]
    assert _reference(moe_path, question, ("a",), 12)[0] != _reference(moe_path, question, ("c",), 12)[0]
    stop = pipelines(moe_path, "torch").config.stop_token_id
    replies = []
    for q in ("Hello, who are you?", "What color is the sky?"):
        query, _ = reference_chat.chat_query("internvl2_5", SHORT_SYSTEM, q, [])
        replies.append(reference_chat.generate(moe_path, query, None, stop, MAX_NEW)[0])
    assert replies[0] != replies[1]


# ------------------------------------------------------------------ config


def _edited_checkpoint_config(src, dst, edit):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config = json.loads((dst / "config.json").read_text())
    edit(config["text_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "layers, step, dense",
    [(4, 1, []), (6, 2, []), (6, 3, [2]), (5, 1, [0, 4]), (4, 2, [1, 3])],
)
def test_sparse_layers_are_the_ones_transformers_builds(layers, step, dense, moe_path, tmp_path):
    def edit(tc):
        tc.update(num_hidden_layers=layers, decoder_sparse_step=step, mlp_only_layers=dense)

    path = _edited_checkpoint_config(moe_path, tmp_path, edit)
    text = ModelConfig.from_pretrained(path).text
    ref_config = InternVLConfig.from_pretrained(path).text_config
    built = [isinstance(Qwen3MoeDecoderLayer(ref_config, i).mlp, Qwen3MoeSparseMoeBlock) for i in range(layers)]
    assert text.sparse_layers == tuple(i for i, sparse in enumerate(built) if sparse)


def test_hub_style_num_experts_is_read_like_transformers_own_num_local_experts(moe_path, tmp_path):
    def edit(tc):
        tc["num_experts"] = tc.pop("num_local_experts")

    assert ModelConfig.from_pretrained(_edited_checkpoint_config(moe_path, tmp_path, edit)).text.num_experts == 8


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda tc: tc.update(num_experts_per_tok=9), "num_experts_per_tok"),
        (lambda tc: tc.update(num_experts_per_tok=0), "num_experts_per_tok"),
        (lambda tc: tc.pop("num_local_experts"), "num_experts"),
        (lambda tc: tc.update(num_local_experts=-1), "num_experts"),
        (lambda tc: tc.pop("moe_intermediate_size"), "moe_intermediate_size"),
        (lambda tc: tc.update(decoder_sparse_step=0), "decoder_sparse_step"),
        (lambda tc: tc.update(mlp_only_layers=[2]), "mlp_only_layers"),
        (lambda tc: tc.update(mlp_only_layers="0"), "mlp_only_layers"),
        (lambda tc: tc.update(norm_topk_prob="yes"), "norm_topk_prob"),
    ],
)
def test_malformed_moe_field_is_refused_at_load_naming_it(edit, field, moe_path, tmp_path):
    path = _edited_checkpoint_config(moe_path, tmp_path, edit)
    with pytest.raises(ConfigError, match=f"text_config '{field}'"):
        ModelConfig.from_pretrained(path)
