"""Prompts: ids equal AutoTokenizer on the reference model.chat query; fake ids follow TensorRT-LLM's convention."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from engine.config import ConfigError, ModelConfig
from engine.prompt import PromptBuilder, PromptError
from engine.templates import TEMPLATES
from engine.tokenizer import TextTokenizer
from tests import reference_chat

SYSTEM = TEMPLATES["internvl2_5"].system_message


@pytest.fixture(scope="module")
def builder(tiny):
    config = ModelConfig.from_pretrained(tiny)
    return config, PromptBuilder(config, TextTokenizer(tiny))


def _as_reference_ids(ids: np.ndarray, config: ModelConfig) -> list[int]:
    """Fake ids → <IMG_CONTEXT>, as the HF-native model sees them."""
    return np.where(ids >= config.text.vocab_size, config.image_token_id, ids).tolist()


CASES = [  # (question, tiles per image, history)
    ("Hello, who are you?", [], None),
    ("Describe the image.", [7], None),  # model.chat prepends "<image>\n"
    ("What is in <image> here?", [1], None),
    ("Compare them.", [2, 1], None),  # no tag, two images: one tag per image
    ("Image-1: <image>\nImage-2: <image>\nCompare them.", [3, 13], None),
    ("And the colours?", [5], [("<image>\nDescribe the image.", "A red boat on a lake.")]),
    ("Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat happens?", [1, 1, 1], None),
    ("再说一遍，用中文。", [], [("Hi", "Hello! 你好")]),
    ("No images here.", [], []),  # an empty history is still a history: nothing is prepended
]


@pytest.mark.parametrize("question, tiles, history", CASES)
def test_prompt_ids_equal_tokenizer_on_reference_query(builder, tiny, question, tiles, history):
    config, prompts = builder
    prompt = prompts.build(question, tiles, history)
    query, expected_question = reference_chat.chat_query("internvl2_5", SYSTEM, question, tiles, history)
    expected = AutoTokenizer.from_pretrained(tiny)(query).input_ids
    assert _as_reference_ids(prompt.input_ids, config) == expected
    assert prompt.question == expected_question
    assert prompt.input_ids.dtype == np.int32


def test_fake_ids_run_over_all_images_of_the_request(builder):
    config, prompts = builder
    q, vocab = config.vision.tokens_per_tile, config.text.vocab_size
    prompt = prompts.build("<image>\n<image>\nCompare.", [2, 3])
    fake = prompt.input_ids[prompt.input_ids >= vocab]
    np.testing.assert_array_equal(fake, vocab + np.arange(5 * q))
    assert prompt.num_image_tokens == 5 * q
    # each image's block sits between its own <img> and </img>
    starts = np.flatnonzero(prompt.input_ids == config.img_start_id)
    ends = np.flatnonzero(prompt.input_ids == config.img_end_id)
    assert (ends - starts - 1).tolist() == [2 * q, 3 * q]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_named_templates_render_like_internvl_conversation(name):
    history = [("<image>\nWhat is it?", "A cat."), ("Colour?", "Black.")]
    rendered = TEMPLATES[name].render("SYS", history, "Name?")
    expected, _ = reference_chat.chat_query(name, "SYS", "Name?", [], history)
    assert rendered == expected


def test_stop_token_is_the_template_separator(builder):
    config, _ = builder
    assert config.stop_token_id == AutoTokenizer.from_pretrained(config.path).convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_chat_template_is_used_when_config_names_none(tiny, tmp_path):
    path = _copy_checkpoint_config(tiny, tmp_path, lambda c: c.pop("template"))
    config = ModelConfig.from_pretrained(path)
    prompts = PromptBuilder(config, TextTokenizer(path))
    tok = AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Describe."},
    ]
    query = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = prompts.build("Describe.", [], [("Hi", "Hello")], system_message="Be brief.")
    assert _as_reference_ids(prompt.input_ids, config) == tok(query).input_ids

    query = tok.apply_chat_template([{"role": "user", "content": "<image>\nDescribe."}], tokenize=False, add_generation_prompt=True)
    query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 * 2 + "</img>")
    prompt = prompts.build("Describe.", [2], system_message="")  # empty system message: no system turn
    assert _as_reference_ids(prompt.input_ids, config) == tok(query).input_ids
    assert config.stop_token_id == tok.convert_tokens_to_ids(tok.eos_token)


@pytest.mark.parametrize(
    "question, tiles, message",
    [
        ("<image>\n<image>\nTwo tags.", [1], "2 <image> tag"),
        ("<image>\nOne tag.", [1, 1], "2 image"),
    ],
)
def test_mismatched_image_tags_are_rejected(builder, question, tiles, message):
    _, prompts = builder
    with pytest.raises(PromptError, match=message):
        prompts.build(question, tiles)


def _copy_checkpoint_config(src, dst, edit):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["text_config"].update(model_type="phi3"), "not supported"),
        (lambda c: c.update(template="vicuna_v1"), "unknown"),
        (lambda c: c.update(image_token_id=5), "image_token_id"),
        (lambda c: c.update(downsample_ratio=0.3), "downsample_ratio"),
        (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "rope"),
        (lambda c: c["text_config"].pop("vocab_size"), "vocab_size"),
        (lambda c: c.update(vision_feature_layer=[-1, -2]), "vision_feature_layer"),
    ],
)
def test_unservable_configs_are_refused_with_the_field_named(tiny, tmp_path, edit, message):
    path = _copy_checkpoint_config(tiny, tmp_path, edit)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_pretrained(path)


def test_config_holds_the_real_internvl_shapes(tiny):
    config = ModelConfig.from_pretrained(tiny)
    raw = json.loads((tiny / "config.json").read_text())
    assert config.vision.tokens_per_tile == 256  # 448/14 patches, pixel shuffle 0.5
    assert config.text.vocab_size == raw["text_config"]["vocab_size"]
    assert config.text.hidden_size == raw["text_config"]["hidden_size"]
    assert config.vision.projector_in_size == 4 * raw["vision_config"]["hidden_size"]
    assert (config.max_num, config.max_tiles_per_image) == (12, 13)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_pretrained(tiny / "nowhere")


def test_gpt_oss_template_renders_as_mpt_two_and_stops_at_sep2():
    """InternVL3.5-GPT-OSS: chat() stops at sep2 (<|return|>); history replies end with sep (<|end|>)."""
    template = TEMPLATES["internvl3_5_gpt_oss"]
    history = [("<image>\nDescribe.", "A lake."), ("And the sky?", "Blue.")]
    messages = [(r, text) for user, reply in history for r, text in ((0, user), (1, reply))] + [(0, "Why?"), (1, None)]
    expected = reference_chat.mpt_two_prompt("internvl3_5_gpt_oss", template.system_message, messages)
    assert template.render(template.system_message, history, "Why?") == expected
    assert template.stop_token == "<|return|>" and TEMPLATES["internvl2_5"].stop_token == "<|im_end|>"
    assert "Reasoning: low" in template.system_message
    # a final assistant message is where sep2 goes (training data), never in a generation prompt
    assert reference_chat.mpt_two_prompt("internvl3_5_gpt_oss", "", [(0, "q"), (1, "a")]).endswith("a<|return|>")


def test_a_template_whose_stop_token_the_tokenizer_lacks_is_refused(tiny, tmp_path):
    path = _copy_checkpoint_config(tiny, tmp_path, lambda c: c.update(template="internvl3_5_gpt_oss"))
    with pytest.raises(ConfigError, match=r"no '<\|return\|>' token"):
        ModelConfig.from_pretrained(path)
