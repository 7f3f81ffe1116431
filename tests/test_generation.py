"""Greedy generation equals transformers' InternVLForConditionalGeneration, token for token.

The reference gets the query built by a port of `model.chat` (tests/reference_chat.py), tokenized
by AutoTokenizer, and pixel values from a port of the cards' `load_image`
(tests/reference_preprocess.py). Our side goes through the whole pipeline: preprocessing, prompt
with fake ids, vision encoder (ONNX Runtime or torch), prompt-table LLM.
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest

from client.synthetic import synthetic_image
from engine.config import ModelConfig
from tests import reference_chat, reference_preprocess
from tests.conftest import LLM_FAMILIES
from tests.pipelines import pipelines  # noqa: F401

MAX_NEW = 12
SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
SHORT_SYSTEM = "You are a helpful assistant."
MIN_MARGIN = 1e-3  # fp32 reordering moves logits by ~1e-5; a mismatch above this margin is a bug



IMAGES = {"a": synthetic_image(101, 500, 300, "PNG"), "b": synthetic_image(202, 300, 700, "PNG"), "c": synthetic_image(303, 640, 480, "PNG")}

# name: (question, image keys, max_tiles)
CASES = {
    "text_only": ("Hello, who are you?", (), 12),
    "one_image": ("Describe the image in detail.", ("a",), 12),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nWhat differs between the two images?", ("a", "b"), 6),
}


def _reference(path, question, image_keys, max_tiles, history=None, template="internvl2_5", system=SYSTEM):
    tiles = [reference_preprocess.load_image(io.BytesIO(IMAGES[k]), max_num=max_tiles).numpy() for k in image_keys]
    query, question = reference_chat.chat_query(template, system, question, [len(t) for t in tiles], history)
    pixel_values = np.concatenate(tiles) if tiles else None
    stop = ModelConfig.from_pretrained(path).stop_token_id
    tokens, margin = reference_chat.generate(path, query, pixel_values, stop, MAX_NEW)
    return tokens, margin, question


@cache
def _reference_cached(path, case):
    question, keys, max_tiles = CASES[case]
    return _reference(path, question, keys, max_tiles)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_generate_matches_transformers(checkpoints, pipelines, family, backend, case):
    path = checkpoints[family]
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference_cached(path, case)
    assert margin > MIN_MARGIN, f"reference top-1/top-2 margin {margin} too small for an exact-token test"

    result = pipelines(path, backend).generate(
        question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles
    )
    assert result.token_ids == expected
    assert result.finish_reason == ("length" if len(expected) == MAX_NEW else "stop")
    assert result.question == expected_question
    assert result.text == reference_chat.reply(path, expected, "<|im_end|>\n")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_second_turn_with_history_matches_transformers(checkpoints, pipelines, family, backend):
    path = checkpoints[family]
    pipe = pipelines(path, backend)
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat(
        "<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, max_tiles=4, return_history=True
    )
    assert history == [("<image>\n<image>\nDescribe both.", first)]

    follow_up = "Which one is brighter?"
    result = pipe.generate(follow_up, images, history=history, max_new_tokens=MAX_NEW, max_tiles=4)

    tiles = [reference_preprocess.load_image(io.BytesIO(b), max_num=4).numpy() for b in images]
    query, _ = reference_chat.chat_query("internvl2_5", SYSTEM, follow_up, [len(t) for t in tiles], history)
    expected, margin = reference_chat.generate(path, query, np.concatenate(tiles), pipe.config.stop_token_id, MAX_NEW)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected
    assert result.question == follow_up  # with history, model.chat leaves the question as it is


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_reference_output_depends_on_image_and_prompt(checkpoints, pipelines, family):
    """Guards the parity tests: a model that ignored its image or prompt would match trivially.

    Prompt sensitivity is shown on text-only prompts with a short system message: in a random
    model a short question is a fraction of a percent of the attention mass next to ~2000 image
    tokens (or an 80-token system message), so there the reply follows the image. The question's
    tokens are pinned exactly by test_prompt.py, and the pipeline's output by the tests above.
    """
    path = checkpoints[family]
    image_a, _, _ = _reference_cached(path, "one_image")
    image_c, _, _ = _reference(path, CASES["one_image"][0], ("c",), 12)
    assert image_a != image_c
    stop = pipelines(path, "torch").config.stop_token_id
    replies = []
    for question in ("Hello, who are you?", "What color is the sky?"):
        query, _ = reference_chat.chat_query("internvl2_5", SHORT_SYSTEM, question, [])
        replies.append(reference_chat.generate(path, query, None, stop, MAX_NEW)[0])
        assert pipelines(path, "torch").generate(question, system_message=SHORT_SYSTEM, max_new_tokens=MAX_NEW).token_ids == replies[-1]
    assert replies[0] != replies[1]
