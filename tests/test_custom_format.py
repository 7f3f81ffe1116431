"""Custom ("GitHub") format checkpoints (internvl_chat / skywork_chat) are served without conversion.

References: a port of InternVLChatModel.chat() over the custom weights (tests/reference_custom_chat.py:
its own InternViT, pixel shuffle by ps_version, select_layer, mlp1, then transformers'
AutoModelForCausalLM), the query from tests/reference_chat.py, pixels from
tests/reference_preprocess.py. Our side: Pipeline with either vision backend.
"""

from __future__ import annotations

import io
import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from build.checkpoint import generate
from client.synthetic import synthetic_image
from engine.config import ConfigError, ModelConfig
from engine.pipeline import Pipeline
from engine.vision import TorchVisionEncoder
from tests import reference_chat, reference_custom_chat, reference_preprocess
from tests.pipelines import pipelines  # noqa: F401

MAX_NEW = 12
MIN_MARGIN = 1e-3
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SHORT_SYSTEM = "You are a helpful assistant."
IMAGES = {"a": synthetic_image(101, 500, 300, "PNG"), "b": synthetic_image(202, 300, 700, "PNG"), "c": synthetic_image(303, 640, 480, "PNG")}
# name: (build.checkpoint.generate kwargs, edits of the generated config.json)
VARIANTS = {
    "qwen2-v2": (dict(llm="qwen2", ps_version="v2"), {}),
    "llama-v1": (dict(llm="llama", ps_version="v1"), {}),
    "qwen3-v2": (dict(llm="qwen3", ps_version="v2"), {}),
    "qwen3_moe-v2": (dict(llm="qwen3_moe", ps_version="v2"), {}),
    "qwen2-v1-layer": (dict(llm="qwen2", ps_version="v2"), {"ps_version": "v1", "select_layer": -2}),
    "skywork-6b": (dict(llm="qwen2", ps_version="v2", vision="internvit-6b", model_type="skywork_chat"), {}),
    # 224 tiles for a tower trained at 448: both sides interpolate the position embeddings (bicubic)
    "llama-force224": (dict(llm="llama", ps_version="v1"), {"force_image_size": 224}),
}
# name: (question, image keys, max_tiles)
CASES = {
    "text_only": ("Hello, who are you?", (), 6),
    "one_image": ("Describe the image in detail.", ("a",), 6),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nCompare the two images.", ("a", "b"), 2),
}


@pytest.fixture(scope="session")
def custom_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            kwargs, edits = VARIANTS[name]
            path = generate("tiny", out=root / "-".join(map(str, kwargs.values())), fmt="custom", **kwargs)
            if edits:
                path = _edited_copy(path, root / name, edits)
            made[name] = path
        return made[name]

    return get


def _edited_copy(src: Path, dst: Path, edits: dict, drop: tuple[str, ...] = ()) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    for key in drop:
        config.pop(key, None)
    for key, value in edits.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def _reference(path, question, keys, max_tiles, history=None, system=SYSTEM, use_thumbnail=True):
    ref = reference_custom_chat.model(path)
    size = ref.config.get("force_image_size") or ref.config["vision_config"]["image_size"]
    tiles = [
        reference_preprocess.load_image(io.BytesIO(IMAGES[k]), input_size=size, max_num=max_tiles, use_thumbnail=use_thumbnail).numpy()
        for k in keys
    ]
    tokens_per_tile = int((size // ref.config["vision_config"]["patch_size"]) ** 2 * ref.config["downsample_ratio"] ** 2)
    query, question = reference_chat.chat_query("internvl2_5", system, question, [len(t) for t in tiles], history, tokens_per_tile)
    stop = ref.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, margin = ref.generate(query, np.concatenate(tiles) if tiles else None, stop, MAX_NEW)
    return tokens, margin, question


@cache
def _reference_case(path, case):
    question, keys, max_tiles = CASES[case]
    return _reference(path, question, keys, max_tiles)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_reply_matches_the_custom_chat_port(custom_checkpoints, pipelines, variant, backend, case):
    path = custom_checkpoints(variant)
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference_case(path, case)
    assert margin > MIN_MARGIN, f"reference top-1/top-2 margin {margin} too small for an exact-token test"
    result = pipelines(path, backend).generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected
    assert result.question == expected_question
    assert result.text == reference_custom_chat.model(path).reply(expected, "<|im_end|>\n")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_second_turn_matches_the_custom_chat_port(custom_checkpoints, pipelines, variant, backend):
    path = custom_checkpoints(variant)
    pipe = pipelines(path, backend)
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat("<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, max_tiles=2, return_history=True)
    expected_first, _, _ = _reference(path, "<image>\n<image>\nDescribe both.", ("a", "c"), 2)
    assert first == reference_custom_chat.model(path).reply(expected_first, "<|im_end|>\n")
    result = pipe.generate("Which one is brighter?", images, history=history, max_new_tokens=MAX_NEW, max_tiles=2)
    expected, margin, _ = _reference(path, "Which one is brighter?", ("a", "c"), 2, history)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected
    assert result.question == "Which one is brighter?"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_reply_depends_on_image_and_prompt(custom_checkpoints, pipelines, variant):
    """Guards the parity tests: a port that ignored its image or prompt would match trivially."""
    path = custom_checkpoints(variant)
    assert _reference_case(path, "one_image")[0] != _reference(path, CASES["one_image"][0], ("c",), 6)[0]
    replies = [_reference(path, q, (), 6, system=SHORT_SYSTEM)[0] for q in ("Hello, who are you?", "What color is the sky?")]
    assert replies[0] != replies[1]
    got = pipelines(path, "torch").generate("What color is the sky?", system_message=SHORT_SYSTEM, max_new_tokens=MAX_NEW)
    assert got.token_ids == replies[1]


def test_features_follow_ps_version_and_select_layer(custom_checkpoints):
    """Each setting changes the port's features, and our encoder follows the checkpoint's."""
    tiles = np.random.default_rng(4).integers(0, 256, (2, 3, 448, 448), dtype=np.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(tiles).float() / 255 - mean) / std  # ToTensor + Normalize, float32
    ref = reference_custom_chat.CustomInternVL(custom_checkpoints("qwen2-v2"))
    features = {}
    for ps_version, layer in (("v2", -1), ("v1", -1), ("v1", -2)):
        ref.config.update(ps_version=ps_version, select_layer=layer)
        features[ps_version, layer] = ref.extract_feature(pixels).reshape(-1, ref.llm.config.hidden_size)
    assert (features["v1", -1] - features["v2", -1]).abs().max() > 1e-2
    assert (features["v1", -2] - features["v1", -1]).abs().max() > 1e-2
    for variant, key in (("qwen2-v2", ("v2", -1)), ("qwen2-v1-layer", ("v1", -2))):
        ours = TorchVisionEncoder(ModelConfig.from_pretrained(custom_checkpoints(variant))).encode(tiles)
        np.testing.assert_allclose(ours, features[key].numpy(), atol=1e-5, rtol=0)


def test_class_defaults_apply_when_fields_are_absent(custom_checkpoints, tmp_path):
    """InternVLChatConfig's defaults (configuration_internvl_chat.py): ps_version v1, select_layer -1,
    dynamic_image_size False, use_thumbnail False, min/max_dynamic_patch 1/6."""
    src = custom_checkpoints("qwen2-v2")
    fields = ("ps_version", "select_layer", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch", "force_image_size")
    path = _edited_copy(src, tmp_path / "defaults", {}, drop=fields)
    config = ModelConfig.from_pretrained(path)
    assert config.vision.ps_version == "v1" and config.vision.num_layers == 2 and config.vision.image_size == 448
    assert (config.max_num, config.min_num, config.use_thumbnail) == (1, 1, False)  # one resized tile
    config = ModelConfig.from_pretrained(_edited_copy(src, tmp_path / "dynamic", {"dynamic_image_size": True}, drop=fields))
    assert (config.max_num, config.min_num, config.use_thumbnail, config.max_tiles_per_image) == (6, 1, False, 6)

    expected, margin, _ = _reference(path, "Describe the image in detail.", ("a",), 1, use_thumbnail=False)
    assert margin > MIN_MARGIN
    with Pipeline.from_pretrained(path, vision_backend="torch") as pipe:
        assert pipe.generate("Describe the image in detail.", [IMAGES["a"]], max_new_tokens=MAX_NEW).token_ids == expected


@pytest.mark.parametrize(
    "edits, drop, field",
    [
        ({"llm_config.model_type": "internlm2"}, (), "llm_config.model_type 'internlm2'"),
        ({"llm_config.model_type": "gemma2"}, (), "llm_config.model_type 'gemma2'"),
        ({}, ("llm_config",), "'llm_config'"),
        ({"vision_config": None}, (), "'vision_config'"),
        ({"ps_version": "v3"}, (), "'ps_version'"),
        ({"select_layer": 3}, (), "'select_layer'"),
        ({"select_layer": "last"}, (), "'select_layer'"),
        ({"vision_config.norm_type": "batch_norm"}, (), "'norm_type'"),
        ({"llm_config.hidden_size": "128"}, (), "llm_config 'hidden_size'"),
        ({"force_image_size": "448"}, (), "'force_image_size'"),
        ({"use_thumbnail": "yes"}, (), "'use_thumbnail'"),
        ({"use_llm_lora": 16}, (), "'use_llm_lora'"),
    ],
)
def test_malformed_custom_config_names_the_field(custom_checkpoints, tmp_path, edits, drop, field):
    src = custom_checkpoints("qwen2-v2")
    tmp_path.joinpath("bad").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, tmp_path / "bad" / name)
    path = _edited_copy(src, tmp_path / "bad", edits, drop)
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_pretrained(path)
    assert field in str(error.value)
    assert "text_config" not in str(error.value)


def test_custom_writer_is_the_inverse_of_the_loader(tmp_path):
    """build.checkpoint writes InternVLChatModel's names (modeling_intern_vit.py / mlp1) in two
    shards; engine/weights.py reads them back to exactly the HF-native tensors."""
    from build.custom_checkpoint import write_custom
    from engine.weights import load_weights

    hf = generate("tiny", "qwen2", tmp_path / "hf", vision="internvit-6b")
    custom = tmp_path / "custom"
    custom.mkdir()
    write_custom(hf, custom, "v2", "skywork_chat")
    index = json.loads((custom / "model.safetensors.index.json").read_text(encoding="utf-8"))["weight_map"]
    layer0 = {k.removeprefix("vision_model.encoder.layers.0.") for k in index if k.startswith("vision_model.encoder.layers.0.")}
    assert layer0 == {"attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "attn.q_norm.weight", "attn.k_norm.weight",
                      "ls1", "ls2", "norm1.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding", "mlp1.0.weight", "mlp1.3.bias"} <= index.keys()
    assert len(set(index.values())) == 2
    config = json.loads((custom / "config.json").read_text(encoding="utf-8"))
    assert (config["model_type"], config["architectures"], config["llm_config"]["architectures"]) == ("skywork_chat", ["SkyworkR1VChatModel"], ["Qwen2ForCausalLM"])
    assert (config["vision_config"]["qkv_bias"], config["vision_config"]["qk_normalization"], config["vision_config"]["norm_type"]) == (False, True, "rms_norm")
    for prefix in ("vision_tower.", "multi_modal_projector.", "language_model.", "lm_head."):
        a, b = load_weights(hf, prefix), load_weights(custom, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
    # the image processor file published custom-format checkpoints ship (llama.cpp's converter reads it):
    # the seed card's normalization (tests/reference_preprocess.py) at the tile size
    processor = json.loads((custom / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert (processor["image_mean"], processor["image_std"]) == (list(reference_preprocess.IMAGENET_MEAN), list(reference_preprocess.IMAGENET_STD))
    assert processor["size"] == processor["crop_size"] == config["force_image_size"] == config["vision_config"]["image_size"]
