"""The build's per-request limits, as Triton's `preprocess` model config carries them (`make build`
wrote them there and the preprocess model enforces them), and the checks the API makes with them
before it decodes or forwards an image. No limit is repeated here: all come from that config."""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

from PIL import Image

from openai_api.conversation import ImageRef
from openai_api.errors import APIError, bad_request

# Body bytes beyond the images' (or the video's) base64: the messages' text, the JSON around it, data-URI prefixes.
TEXT_ROOM = 1 << 20
# What PIL raises for data it cannot read as an image; the ensemble's decoder then says why (400).
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error)


@dataclass(frozen=True)
class RequestLimits:
    max_images: int  # image parts per request
    max_image_pixels: int  # width × height of each image, read from its header
    max_image_bytes: int  # encoded bytes of all the request's images, or of its video (the build's max_request_bytes)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> RequestLimits:
        try:
            return cls(int(parameters["max_images"]), int(parameters["max_image_pixels"]), int(parameters["max_request_bytes"]))
        except (KeyError, ValueError) as e:
            raise APIError(500, f"Triton's preprocess model config lacks a valid limit parameter ({e}): rebuild the repository (make build)") from None

    @property
    def body_bytes(self) -> int:
        """The default body limit (--max-request-bytes): every image, or the video, as base64 (4/3 of
        its bytes) plus TEXT_ROOM."""
        return math.ceil(self.max_image_bytes * 4 / 3) + TEXT_ROOM

    def check_count(self, images: list[ImageRef]) -> None:
        if len(images) > self.max_images:
            raise bad_request(f"the request has {len(images)} images; this deployment allows {self.max_images}", "messages")

    def check_bytes(self, total: int, where: str) -> None:
        """total: the bytes of the request's images up to the one at `where` (or of its video)."""
        if total > self.max_image_bytes:
            what = f"video ({where}) has" if where.endswith("video_url") else f"images up to {where} hold"
            raise bad_request(f"the request's {what} {total} bytes; this deployment allows {self.max_image_bytes} per request", "messages")

    def check_pixels(self, data: bytes, where: str) -> None:
        """Reads only the image's header (PIL decodes nothing before asked)."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError as e:  # beyond PIL's own limit, far beyond any build's
            raise bad_request(f"{where}: {e}; this deployment allows {self.max_image_pixels} pixels", where) from None
        except _UNREADABLE:
            return
        if width * height > self.max_image_pixels:
            raise bad_request(f"{where}: {width}×{height} is {width * height} pixels; this deployment allows {self.max_image_pixels}", where)


class TritonLimits:
    """RequestLimits read from Triton once it answers, then kept (as the served model name is)."""

    def __init__(self, backend):
        self.backend = backend
        self.known: RequestLimits | None = None

    async def get(self) -> RequestLimits | None:
        """None while Triton does not answer."""
        if self.known is None:
            parameters = await self.backend.preprocess_parameters()
            if parameters is not None:
                self.known = RequestLimits.from_parameters(parameters)
        return self.known
