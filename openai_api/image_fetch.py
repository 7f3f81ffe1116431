"""One image from an http(s) URL, read by an async HTTP client (httpx2, the client the openai SDK
uses) within a total deadline and a byte limit. At the deadline the request is cancelled and its
connection closed: nothing keeps reading in the background (a worker thread would, and a few slow
servers would then hold every later fetch). Redirects are not followed: one could lead an
allow-listed host's URL anywhere."""

from __future__ import annotations

import asyncio

import httpx2


class FetchError(Exception):
    """Why the image could not be fetched (the message names no URL: the caller adds it)."""


async def fetch_image(url: str, max_bytes: int, deadline: float) -> bytes:
    """The body of a 200 response; FetchError for anything else, TimeoutError after `deadline` seconds."""
    async with asyncio.timeout(deadline):
        # timeout=None: the deadline above is the only time limit; identity: the limit counts the bytes
        # that arrive, with no decompression that could turn them into many more.
        async with httpx2.AsyncClient(follow_redirects=False, timeout=None) as client:
            try:
                async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
                    return await _body(response, max_bytes)
            except (httpx2.HTTPError, httpx2.InvalidURL) as e:
                raise FetchError(str(e) or type(e).__name__) from None


async def _body(response: httpx2.Response, max_bytes: int) -> bytes:
    if response.is_redirect:
        raise FetchError(f"redirect to {response.headers.get('Location', '?')} refused")
    if response.status_code != 200:
        raise FetchError(f"HTTP {response.status_code} {response.reason_phrase}")
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise FetchError(f"Content-Encoding {response.headers['Content-Encoding']} is not supported")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise FetchError(f"the image is {int(length)} bytes, the limit is {max_bytes}")
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk[: max_bytes + 1 - len(data)]
        if len(data) > max_bytes:
            raise FetchError(f"the image is larger than the limit of {max_bytes} bytes")
    return bytes(data)
