"""The vision-feature cache (engine/vision_cache.py, engine/image_features.py): a repeated image skips
decoding, tiling and the encoder and gives token-identical replies; other images or other tiling miss;
the LRU keeps its byte bound."""

from __future__ import annotations

import numpy as np
import pytest

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from engine.vision_cache import ImageFeatures, VisionCache
from tests.repository_checks import metric_value

A, B = synthetic_image(21, 640, 400, "PNG"), synthetic_image(22, 500, 700, "JPEG")
QUESTION = "Describe the image."


class CountingEncoder:
    """The real encoder, counting the tiles it is asked to encode."""

    def __init__(self, encoder):
        self.encoder, self.tiles = encoder, 0

    def encode_requests(self, requests):
        self.tiles += sum(len(r) for r in requests)
        return self.encoder.encode_requests(requests)


@pytest.fixture
def pipes(tiny):
    with Pipeline.from_pretrained(tiny) as cached, Pipeline.from_pretrained(tiny, vision_cache_mib=0) as cold:
        cached.images.encoder = CountingEncoder(cached.images.encoder)
        yield cached, cold


def test_a_repeated_image_is_served_from_the_cache_with_the_same_tokens(pipes):
    cached, cold = pipes
    first = cached.generate(QUESTION, [A], max_new_tokens=12)
    tiles, cache = cached.images.encoder.tiles, cached.images.cache
    assert tiles > 1 and (cache.hits, cache.misses) == (0, 1)
    again = cached.generate(QUESTION, [A], max_new_tokens=12)
    assert cached.images.encoder.tiles == tiles and (cache.hits, cache.misses) == (1, 1)  # no encoder call
    expected = cold.generate(QUESTION, [A], max_new_tokens=12)
    assert first.token_ids == again.token_ids == expected.token_ids
    assert expected.token_ids != cold.generate(QUESTION, [B], max_new_tokens=12).token_ids  # the image matters


def test_other_images_and_other_tiling_miss(pipes):
    cached, cold = pipes
    cached.generate(QUESTION, [A], max_new_tokens=2)
    for images, max_tiles in (([B], None), ([A], 2)):
        misses, tiles = cached.images.cache.misses, cached.images.encoder.tiles
        reply = cached.generate(QUESTION, images, max_new_tokens=12, max_tiles=max_tiles)
        assert cached.images.cache.misses == misses + 1 and cached.images.encoder.tiles > tiles
        assert reply.token_ids == cold.generate(QUESTION, images, max_new_tokens=12, max_tiles=max_tiles).token_ids


def test_a_request_mixing_cached_and_new_images_encodes_only_the_new_ones(pipes):
    cached, cold = pipes
    cached.generate(QUESTION, [A], max_new_tokens=2)
    tiles = cached.images.encoder.tiles
    question = "<image>\n<image>\nCompare them."
    reply = cached.generate(question, [A, B], max_new_tokens=12)
    b_tiles = sum(cold.prepare(QUESTION, [B]).features.num_tiles)
    assert cached.images.encoder.tiles - tiles == b_tiles
    assert reply.token_ids == cold.generate(question, [A, B], max_new_tokens=12).token_ids


def _features(rows: int) -> ImageFeatures:
    return ImageFeatures(np.zeros((rows, 4), np.float32), np.full(rows // 2, 2, np.int32))


def test_the_lru_keeps_its_byte_bound_and_evicts_the_least_recent():
    one = _features(8).nbytes  # 8 × 4 × 4 + 4 × 4 = 144 bytes
    cache = VisionCache(max_bytes=3 * one)
    for key in "abc":
        cache.put(key, _features(8))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("d", _features(8))
    assert cache.bytes == 3 * one and cache.get("b") is None and all(cache.get(k) for k in "acd")
    cache.put("huge", _features(64))  # bigger than the whole cache: not kept, nothing evicted for it
    assert cache.get("huge") is None and cache.bytes == 3 * one
    off = VisionCache(max_bytes=0)
    off.put("a", _features(8))
    assert off.get("a") is None and off.bytes == 0


def test_served_repeat_is_a_cache_hit_with_the_same_reply_and_no_encoder_run(server):
    """Through the ensemble: the vision model's cache serves the second request (no tiles encoded),
    the reply is token-identical; another tile budget misses. The counters are Prometheus metrics."""
    image = synthetic_image(23, 900, 300, "PNG")
    client = InternVLClient(server.grpc_url)
    names = ("internvl_vision_cache_hits_total", "internvl_vision_cache_misses_total", "internvl_vision_encoded_tiles_total")

    def counters():
        return [metric_value(server, name) for name in names]

    start = counters()
    first = client.generate(QUESTION, [image], max_tokens=12)
    after_first = counters()
    assert after_first[1] == start[1] + 1 and after_first[2] > start[2]
    second = client.generate(QUESTION, [image], max_tokens=12)
    assert counters() == [after_first[0] + 1, after_first[1], after_first[2]]  # a hit: nothing decoded or encoded
    assert (second.text, second.prompt_tokens) == (first.text, first.prompt_tokens)
    client.generate(QUESTION, [image], max_tokens=2, max_tiles=2)
    assert counters()[1] == after_first[1] + 1
    assert metric_value(server, "internvl_vision_cache_bytes") > 0
