"""InternLM2 language models as InternVL ships them (InternVL2.5-2B/8B/26B, InternVL3-9B): custom-format
checkpoints with `llm_config.model_type` internlm2 and InternLM2ForCausalLM's weight names, served
token-identical to a port of InternVLChatModel.chat().

Reference: tests/reference_custom_chat.py (its own InternViT / pixel shuffle / mlp1; the InternLM2
decoder as transformers' LlamaForCausalLM after its own renaming and grouped wqkv split, written from
modeling_internlm2.py), the query from tests/reference_chat.py's internlm2-chat template. Checkpoint:
build.checkpoint `--llm internlm2 --format custom` (a seeded Llama written as InternLM2, 4 query heads
over 2 kv heads, so the grouped wqkv layout matters).
"""

from __future__ import annotations

import io
import json
import shutil
from functools import cache

import numpy as np
import pytest
import torch

from build.checkpoint import generate
from client.synthetic import synthetic_image
from engine.config import ConfigError, ModelConfig
from engine.llm.model import DecoderLM
from engine.weights import load_weights
from tests import reference_chat, reference_custom_chat, reference_preprocess
from tests.pipelines import pipelines  # noqa: F401

MAX_NEW = 12
MIN_MARGIN = 1e-3
TEMPLATE = "internlm2-chat"
# internlm2-chat's default system message (InternVL conversation.py; ../shared/MODELS.md)
SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SHORT_SYSTEM = "You are a helpful assistant."
STOP = "<|im_end|>"
IMAGES = {"a": synthetic_image(101, 500, 300, "PNG"), "b": synthetic_image(202, 300, 700, "PNG"), "c": synthetic_image(303, 640, 480, "PNG")}
CASES = {
    "text_only": ("Hello, who are you?", (), 6),
    "one_image": ("Describe the image in detail.", ("a",), 6),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nCompare the two images.", ("a", "b"), 2),
}


@pytest.fixture(scope="session")
def internlm2(tmp_path_factory):
    return generate("tiny", "internlm2", tmp_path_factory.mktemp("internlm2") / "ckpt", fmt="custom", ps_version="v2")


@pytest.fixture(scope="session")
def internlm2_dynamic(internlm2, tmp_path_factory):
    """As InternLM2.5-7B (InternVL2.5-8B) ships it: dynamic NTK rope scaling, factor 2; with a
    2048-token context, so the rescaling would start close to the prompts if it were applied early."""
    dst = tmp_path_factory.mktemp("internlm2-dynamic") / "ckpt"
    shutil.copytree(internlm2, dst, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
    config["llm_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=2048)
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def _reference(path, question, keys, max_tiles, history=None, system=SYSTEM):
    ref = reference_custom_chat.model(path)
    tiles = [reference_preprocess.load_image(io.BytesIO(IMAGES[k]), input_size=448, max_num=max_tiles).numpy() for k in keys]
    query, question = reference_chat.chat_query(TEMPLATE, system, question, [len(t) for t in tiles], history)
    tokens, margin = ref.generate(query, np.concatenate(tiles) if tiles else None, ref.tokenizer.convert_tokens_to_ids(STOP), MAX_NEW)
    return tokens, margin, question


@cache
def _reference_case(path, case):
    question, keys, max_tiles = CASES[case]
    return _reference(path, question, keys, max_tiles)


def test_checkpoint_is_internlm2_as_shipped_and_loads_to_the_llama_tensors(internlm2, tmp_path):
    """The writer emits InternLM2ForCausalLM's names and config; the loader maps them back to exactly
    the Llama tensors the checkpoint was made from (wqkv fused and split again)."""
    from build.custom_checkpoint import write_custom

    config = json.loads((internlm2 / "config.json").read_text(encoding="utf-8"))
    llm = config["llm_config"]
    assert (llm["model_type"], llm["architectures"], config["template"]) == ("internlm2", ["InternLM2ForCausalLM"], TEMPLATE)
    assert llm["bias"] is False and llm["rope_scaling"] is None and "head_dim" not in llm
    assert llm["num_key_value_heads"] < llm["num_attention_heads"]
    index = json.loads((internlm2 / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
    layer0 = {k.removeprefix("language_model.model.layers.0.") for k in index if k.startswith("language_model.model.layers.0.")}
    assert layer0 == {"attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                      "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"}
    assert {"language_model.model.tok_embeddings.weight", "language_model.model.norm.weight", "language_model.output.weight"} <= index.keys()

    hf = generate("tiny", "llama", tmp_path / "hf")
    custom = tmp_path / "custom"
    custom.mkdir()
    write_custom(hf, custom, "v2", "internvl_chat", internlm2=True)
    for prefix in ("language_model.", "lm_head."):
        a, b = load_weights(hf, prefix), load_weights(custom, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    text = ModelConfig.from_pretrained(internlm2).text
    assert (text.model_type, text.attention_bias, text.qk_norm, text.head_dim) == ("internlm2", False, False, 32)
    assert (text.num_heads, text.num_kv_heads, text.rope_theta) == (4, 2, llm["rope_theta"])


def test_wqkv_split_is_grouped_per_kv_head(internlm2):
    """Our decoder's logits equal the port's; splitting wqkv as plain q|k|v blocks (the wrong,
    ungrouped layout) changes them, so the parity tests would catch a wrong split."""
    config = ModelConfig.from_pretrained(internlm2)
    ours = DecoderLM.from_pretrained(internlm2, config.text)
    ref = reference_custom_chat.model(internlm2).llm
    ids = torch.randint(0, 1024, (23,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(input_ids=ids[None]).logits[0, -1]

    def logits(model):
        from engine.llm.model import SequenceInput

        return model.forward([SequenceInput(ids, 0, model.new_cache(len(ids)), None)])[0]

    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-4)

    weights = load_weights(internlm2, "language_model.")
    c = config.text
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        grouped = [weights[f"layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        fused = reference_custom_chat.model(internlm2).w[f"language_model.model.layers.{i}.attention.wqkv.weight"]
        assert not torch.equal(torch.cat(grouped), fused)  # the stored rows are not plain q|k|v blocks
        q, k, v = fused.split([q_rows, kv_rows, kv_rows])
        weights.update({f"layers.{i}.self_attn.q_proj.weight": q, f"layers.{i}.self_attn.k_proj.weight": k, f"layers.{i}.self_attn.v_proj.weight": v})
    wrong = DecoderLM(c, weights, load_weights(internlm2, "lm_head.", required=False).get("weight"))
    assert (logits(wrong) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_reply_matches_the_internlm2_chat_port(internlm2, pipelines, backend, case):
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference_case(internlm2, case)
    assert margin > MIN_MARGIN, f"reference top-1/top-2 margin {margin} too small for an exact-token test"
    result = pipelines(internlm2, backend).generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected
    assert result.question == expected_question
    assert result.text == reference_custom_chat.model(internlm2).reply(expected, STOP)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_second_turn_matches_the_internlm2_chat_port(internlm2, pipelines, backend):
    pipe = pipelines(internlm2, backend)
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat("<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, max_tiles=2, return_history=True)
    expected_first, _, _ = _reference(internlm2, "<image>\n<image>\nDescribe both.", ("a", "c"), 2)
    assert first == reference_custom_chat.model(internlm2).reply(expected_first, STOP)
    result = pipe.generate("Which one is brighter?", images, history=history, max_new_tokens=MAX_NEW, max_tiles=2)
    expected, margin, _ = _reference(internlm2, "Which one is brighter?", ("a", "c"), 2, history)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected


@pytest.mark.parametrize("case", ["text_only", "one_image"])
def test_dynamic_ntk_rope_scaling_matches_the_port_within_the_context(internlm2_dynamic, pipelines, case):
    question, keys, max_tiles = CASES[case]
    expected, margin, _ = _reference_case(internlm2_dynamic, case)
    assert margin > MIN_MARGIN
    assert ModelConfig.from_pretrained(internlm2_dynamic).text.max_position_embeddings == 2048
    result = pipelines(internlm2_dynamic, "torch").generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected


def test_reference_reply_depends_on_image_and_prompt(internlm2, pipelines):
    """Guards the parity tests: a port that ignored its image or prompt would match trivially."""
    assert _reference_case(internlm2, "one_image")[0] != _reference(internlm2, CASES["one_image"][0], ("c",), 6)[0]
    replies = [_reference(internlm2, q, (), 6, system=SHORT_SYSTEM)[0] for q in ("Hello, who are you?", "What color is the sky?")]
    assert replies[0] != replies[1]
    got = pipelines(internlm2, "torch").generate("What color is the sky?", system_message=SHORT_SYSTEM, max_new_tokens=MAX_NEW)
    assert got.token_ids == replies[1]


@pytest.mark.parametrize(
    "edits, drop, field",
    [
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, (), "'rope_scaling'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, (), "'rope_scaling'"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, (), "'rope_scaling'"),
        ({"bias": True}, (), "'bias' True"),
        ({}, ("bias",), "'bias' True"),  # InternLM2Config's default
        ({"rope_pos_id_version": "v2pe"}, (), "'rope_pos_id_version'"),
        ({"hidden_size": 130}, (), "'hidden_size' 130"),
    ],
)
def test_unsupported_internlm2_fields_are_refused_by_name(internlm2, tmp_path, edits, drop, field):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (internlm2 / name).is_file():
            shutil.copy(internlm2 / name, bad / name)
    config = json.loads((internlm2 / "config.json").read_text(encoding="utf-8"))
    for key in drop:
        del config["llm_config"][key]
    config["llm_config"].update(edits)
    (bad / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_pretrained(bad)
    assert field in str(error.value) and "llm_config" in str(error.value)
    assert "text_config" not in str(error.value)


def test_hf_native_internlm2_is_refused_pointing_to_the_custom_format(internlm2, tmp_path):
    """transformers has no InternLM2 model, so no HF-native (text_config) InternLM2 layout exists."""
    from engine.text_config import text_config as _text_config

    llm = json.loads((internlm2 / "config.json").read_text(encoding="utf-8"))["llm_config"]
    with pytest.raises(ConfigError, match="text_config.model_type 'internlm2' is not supported.*no HF-native layout"):
        _text_config(dict(llm, bias=False), "text_config")
