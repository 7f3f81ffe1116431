"""Content keys of images: two images with the same key give the same vision features, so their
features (engine/vision_cache.py) and the KV of prompts that hold them (prefix reuse) can be shared.

A key covers the image's encoded bytes (a video frame's: the video's and the frame number) and
everything that changes its tiles or their features: the model (its checkpoint files), the tile
size, the tile budget (a video's: tiles per frame), min tiles and the thumbnail, and on an
InternVL3.5-Flash checkpoint the routing, which is decided over all tiles of a request
(engine/flash.py): there the key also covers the request's other images and the image's place among them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engine.config import ModelConfig
from engine.preprocess import ImageError
from engine.video_frames import VideoFrame


def image_digest(image) -> str:
    """image: encoded bytes, a path (its bytes), a PIL image (its mode, size and pixels) or a video
    frame (the video's bytes and the frame's number)."""
    digest = hashlib.sha256()
    if isinstance(image, VideoFrame):
        digest.update(f"video {image.video.digest} frame {image.index}".encode())
    elif isinstance(image, (bytes, bytearray, memoryview)):
        digest.update(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            digest.update(Path(image).read_bytes())
        except OSError as e:
            raise ImageError(f"cannot open image file {os.fspath(image)!r}: {e.strerror or e}") from e
    elif isinstance(image, Image.Image):
        digest.update(f"PIL {image.mode} {image.size}".encode())
        digest.update(image.tobytes())
    else:
        raise TypeError(f"image must be a path, encoded bytes or a PIL.Image.Image, not {type(image).__name__}")
    return digest.hexdigest()


def model_fingerprint(config: ModelConfig) -> str:
    """The checkpoint (its resolved path and the size and modification time of its weight and config
    files): a rebuilt or replaced checkpoint gets new keys."""
    path = Path(config.path).resolve()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    stamp = [str(path)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ImageKeys:
    model: str  # model_fingerprint
    image_size: int
    min_num: int
    use_thumbnail: bool
    flash: object | None  # FlashConfig: routing is per request

    @classmethod
    def of(cls, config: ModelConfig) -> ImageKeys:
        return cls(model_fingerprint(config), config.vision.image_size, config.min_num, config.use_thumbnail, config.flash)

    def keys(self, images: list, max_tiles: int) -> list[str]:
        """One key per image of a request, in order."""
        digests = [image_digest(data) for data in images]
        common = f"{self.model}|{self.image_size}|{self.min_num}|{max_tiles}|{self.use_thumbnail}"
        if self.flash is not None:
            common += f"|{self.flash}|{','.join(digests)}"
            digests = [f"{i}:{d}" for i, d in enumerate(digests)]
        return [hashlib.sha256(f"{common}|{d}".encode()).hexdigest() for d in digests]
