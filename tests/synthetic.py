"""Seeded synthetic images for the tests: a coloured gradient (so resizes and tiles differ) plus noise."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (640, 400), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    gradient = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.2, 1, (1, 1, 3))
    pixels = np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()
