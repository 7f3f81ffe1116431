"""Seeded synthetic images (benchmarks and tests): coloured gradients + noise + a few flat blocks."""

from __future__ import annotations

import io

import numpy as np


def synthetic_image(seed: int, width: int, height: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """Seeded gradients + noise + a few flat blocks, encoded as `fmt`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = 255 * (x * rng.uniform(0.2, 1, 3) + y * rng.uniform(0, 0.6, 3)) / 1.6
    for _ in range(4):  # flat rectangles: edges for the bicubic filter
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        pixels[y0 : y0 + height // 5, x0 : x0 + width // 5] = rng.uniform(0, 255, 3)
    pixels = pixels + rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 90}, "WEBP": {"quality": 85}, "PNG": {"compress_level": 1}}.get(fmt, {})
    image.save(buf, format=fmt, **options)
    return buf.getvalue()
