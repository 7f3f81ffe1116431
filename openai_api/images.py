"""Image parts (and a video part) -> encoded bytes within the build's limits (openai_api/limits.py):
data URIs and plain base64 are decoded here; remote http(s) URLs are fetched only from hosts the operator
allow-listed, within a byte and a time limit (openai_api/image_fetch.py). Whether the bytes are an
image is the ensemble's call (its ImageError is a 400 too)."""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from openai_api.conversation import ImageRef, VideoRef
from openai_api.errors import bad_request
from openai_api.image_fetch import FetchError, fetch_image
from openai_api.limits import RequestLimits
from openai_api.settings import Settings


class ImageLoader:
    def __init__(self, settings: Settings):
        self.allowed_hosts = {h.lower() for h in settings.allow_image_hosts}
        self.max_bytes = settings.max_image_bytes
        self.timeout = settings.image_fetch_timeout

    async def load(self, images: list[ImageRef], limits: RequestLimits) -> list[bytes]:
        """Too many images are refused before any is decoded; then each one's bytes (with those before
        it) and pixels (its header) are checked before the next is decoded or fetched."""
        limits.check_count(images)
        loaded, total = [], 0
        for image in images:
            data = await self.load_one(image)
            total += len(data)
            limits.check_bytes(total, image.where)
            limits.check_pixels(data, image.where)
            loaded.append(data)
        return loaded

    async def load_video(self, video: VideoRef, limits: RequestLimits) -> bytes:
        """The video's bytes within the request's byte limit; whether they are a video (and its
        length, frames and frame size) is the ensemble's call (its VideoError is a 400 too)."""
        data = await self.load_one(video)
        limits.check_bytes(len(data), video.where)
        return data

    async def load_one(self, image: ImageRef | VideoRef) -> bytes:
        url = image.url.url.strip()
        where = image.where
        if url.startswith("data:"):
            return _decode_data_uri(url, where, image.kind)
        scheme = url.partition(":")[0].lower()
        if scheme in ("http", "https"):
            return await self._fetch(url, where, image.kind)
        if scheme.isalpha() and url[len(scheme) : len(scheme) + 3] == "://":
            raise bad_request(f"{where}: unsupported URL scheme {scheme!r} (use a data URI, base64 or http(s))", where)
        return _decode_base64(url, where, image.kind)

    async def _fetch(self, url: str, where: str, kind: str) -> bytes:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        if host not in self.allowed_hosts:
            raise bad_request(
                f"{where}: remote {kind} URLs are refused unless the server allows their host "
                f"(--allow-image-host); {host!r} is not allowed. Send the {kind} as a base64 data URI.",
                where,
            )
        try:
            return await fetch_image(url, self.max_bytes, self.timeout)
        except TimeoutError:
            raise bad_request(f"{where}: fetching {url} took longer than {self.timeout:g} s", where) from None
        except FetchError as e:
            raise bad_request(f"{where}: could not fetch {url}: {e}", where) from None


def _decode_data_uri(url: str, where: str, kind: str) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        example = "image/png" if kind == "image" else "video/mp4"
        raise bad_request(f"{where}: a data URI must look like data:{example};base64,<data>", where)
    return _decode_base64(payload, where, kind)


def _decode_base64(text: str, where: str, kind: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: invalid base64 {kind} data", where) from None
    if not data:
        raise bad_request(f"{where}: empty {kind}", where)
    return data
