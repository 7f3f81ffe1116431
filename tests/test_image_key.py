"""engine/image_key.py: equal keys exactly when the vision features are equal."""

from __future__ import annotations

import dataclasses

from client.synthetic import synthetic_image
from engine.config import ModelConfig
from engine.flash import FlashConfig
from engine.image_key import ImageKeys

A, B = synthetic_image(1, 640, 400, "PNG"), synthetic_image(2, 640, 400, "PNG")


def test_keys_follow_the_bytes_the_tiling_and_the_model(tiny, checkpoints):
    keys = ImageKeys.of(ModelConfig.from_pretrained(tiny))
    assert keys.keys([A, B], 6) == keys.keys([A], 6) + keys.keys([B], 6)  # per image, order kept
    assert keys.keys([A], 6) == ImageKeys.of(ModelConfig.from_pretrained(tiny)).keys([A], 6)
    assert len({*keys.keys([A], 6), *keys.keys([B], 6), *keys.keys([A], 1)}) == 3
    assert keys.keys([A], 6) != dataclasses.replace(keys, use_thumbnail=not keys.use_thumbnail).keys([A], 6)
    assert keys.keys([A], 6) != ImageKeys.of(ModelConfig.from_pretrained(checkpoints["qwen2"])).keys([A], 6)


def test_flash_keys_cover_the_requests_other_images(tiny):
    """Flash routes over all tiles of a request (engine/flash.py): an image's features depend on the others."""
    keys = dataclasses.replace(ImageKeys.of(ModelConfig.from_pretrained(tiny)), flash=FlashConfig(0.5, 0.1, 64))
    alone, paired = keys.keys([A], 6), keys.keys([A, B], 6)
    assert alone[0] != paired[0] and keys.keys([A, B], 6) == paired and keys.keys([B, A], 6)[1] != paired[0]
