"""Prefix reuse through tritonserver: the CPU llm model turns the ensemble's image_keys / image_tiles
into the engine's table keys and counts reused prompt tokens in internvl_prefix_cache_hit_tokens_total."""

from __future__ import annotations

import numpy as np
import pytest

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from tests.repository_checks import metric_value

IMAGE, OTHER = synthetic_image(41, 640, 400, "PNG"), synthetic_image(42, 640, 400, "PNG")  # only this module sends them
HITS = "internvl_prefix_cache_hit_tokens_total"


@pytest.fixture(scope="module")
def pipe(tiny):
    with Pipeline.from_pretrained(tiny) as pipe:
        yield pipe


def test_served_second_turn_with_the_same_image_reuses_the_first_turns_prompt(server, pipe):
    client = InternVLClient(server.grpc_url)
    first = client.generate("Describe the image.", [IMAGE], max_tokens=12)
    history = [("<image>\nDescribe the image.", first.text)]  # model.chat's history: the tag it prepended
    before = metric_value(server, HITS)
    second = client.generate("What colour dominates?", [IMAGE], history=history, max_tokens=12)
    reused = metric_value(server, HITS) - before
    assert reused >= 0.9 * first.prompt_tokens and first.prompt_tokens > 256  # the image's tokens included
    assert second.text == pipe.chat("What colour dominates?", [IMAGE], history, max_new_tokens=12)
    # the same history on another image reuses the text before the image only, and answers for that image
    before = metric_value(server, HITS)
    other = client.generate("What colour dominates?", [OTHER], history=history, max_tokens=12)
    assert metric_value(server, HITS) - before < 256  # less than one tile: none of the image
    assert other.text == pipe.chat("What colour dominates?", [OTHER], history, max_new_tokens=12) != second.text


def test_llm_refuses_image_keys_that_do_not_match_the_tile_counts(server, tiny):
    from engine.config import ModelConfig
    from tests.test_gpu_repository import _call_llm

    config = ModelConfig.from_pretrained(tiny)
    q, vocab = config.vision.tokens_per_tile, config.text.vocab_size
    ids = np.array([[5, 6, *range(vocab, vocab + q), 7]], np.int32)
    request = {
        "input_ids": ids,
        "input_lengths": np.array([[ids.shape[1]]], np.int32),
        "request_output_len": np.array([[3]], np.int32),
        "prompt_embedding_table": np.zeros((1, q, config.text.hidden_size), np.float32),
        "image_keys": np.array([[b"a", b"b"]], dtype=object),
        "image_tiles": np.array([[1]], np.int32),
    }
    with pytest.raises(Exception, match="image_keys has 2 keys but image_tiles 1 tile counts"):
        _call_llm(server, request)
    request["image_keys"], request["image_tiles"] = np.array([[b"a"]], dtype=object), np.array([[2]], np.int32)  # 512 rows
    with pytest.raises(Exception, match="table_keys cover 512 prompt-table rows but the prompt table has 256"):
        _call_llm(server, request)
    request["image_tiles"] = np.array([[1]], np.int32)
    assert len(_call_llm(server, request)[0]["output_ids"][0]) == 3
