"""max_total_tiles: a request's images share a tile budget as InternVL's evaluations do (VLMEvalKit's
InternVL generate_v2: max_num = max(1, min(max_num, total_max_num // image_num)))."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.config import ModelConfig
from engine.pipeline import Pipeline
from tests import reference_preprocess

IMAGES = [synthetic_image(31 + i, w, h, "PNG") for i, (w, h) in enumerate([(1600, 500), (900, 900), (400, 1200)])]


def _vlmevalkit_max_num(max_num: int, total_max_num: int, image_num: int) -> int:
    return max(1, min(max_num, total_max_num // image_num))  # the evaluation code's expression


@pytest.mark.parametrize("total, images", [(64, 1), (64, 3), (8, 3), (12, 5), (2, 4), (None, 3)])
def test_the_budget_per_image_follows_the_evaluation_code(tiny, total, images):
    config = ModelConfig.from_pretrained(tiny)
    expected = config.max_num if total is None else _vlmevalkit_max_num(config.max_num, total, images)
    assert config.tile_budget(None, total, images) == expected
    assert config.tile_budget(3, total, images) == (3 if total is None else _vlmevalkit_max_num(3, total, images))


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_a_bad_budget_is_refused_naming_it(tiny, bad):
    with pytest.raises(ValueError, match="max_total_tiles"):
        ModelConfig.from_pretrained(tiny).tile_budget(None, bad, 2)


@pytest.fixture(scope="module")
def pipe(tiny):
    with Pipeline.from_pretrained(tiny) as pipeline:
        yield pipeline


def test_the_pipelines_tiles_equal_the_cards_load_image_at_the_shrunk_max_num(pipe):
    question = "<image>\n<image>\n<image>\nCompare."
    features = pipe.prepare(question, IMAGES, max_total_tiles=8).features
    per_image = _vlmevalkit_max_num(pipe.config.max_num, 8, 3)
    reference = [len(reference_preprocess.load_image(Image.open(io.BytesIO(b)), max_num=per_image)) for b in IMAGES]
    assert features.num_tiles == reference
    assert reference != [len(reference_preprocess.load_image(Image.open(io.BytesIO(b)))) for b in IMAGES]  # it shrank


def test_served_requests_take_the_same_budget(server, pipe):
    question = "<image>\n<image>\nCompare."
    expected = pipe.generate(question, IMAGES[:2], max_new_tokens=8, max_total_tiles=6)
    reply = InternVLClient(server.grpc_url).generate(question, IMAGES[:2], max_tokens=8, extra={"max_total_tiles": ("INT32", 6)})
    assert (reply.text, reply.prompt_tokens) == (expected.text, expected.prompt_tokens)
    assert expected.prompt_tokens != pipe.generate(question, IMAGES[:2], max_new_tokens=8).prompt_tokens
