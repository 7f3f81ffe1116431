"""The request body limit, as a pure ASGI middleware, so that no request makes the server hold more
than the limit: a declared Content-Length over it is refused (413) before anything is read; a body
without one (chunked) is read up to the limit and refused as soon as it goes over. The app then gets
the body as it came, so FastAPI never buffers more than the limit either."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from openai_api.errors import APIError, error_response


class BodyLimit:
    def __init__(self, app, limit: Callable[[], Awaitable[int | None]], unknown: str = "the request size limit is unknown"):
        """limit: the body limit in bytes; None while unknown (Triton has not answered): then a
        request with a body gets 503 with the message `unknown`."""
        self.app, self.limit, self.unknown = app, limit, unknown

    async def __call__(self, scope, receive, send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        declared = int(headers.get(b"content-length", 0))  # h11 has checked that it is a number
        if not declared and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)  # no body (or not HTTP)
        limit = await self.limit()
        if limit is None:
            return await error_response(APIError(503, self.unknown))(scope, receive, send)
        if declared > limit:
            return await _too_large(f"the request body is {declared} bytes; this server accepts at most {limit}")(scope, receive, send)
        body, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > limit:
                return await _too_large(f"the request body goes over this server's limit of {limit} bytes")(scope, receive, send)
            body.append(message)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(body, receive), send)


def _too_large(message: str):
    return error_response(APIError(413, f"{message} (--max-request-bytes)"))


def _replay(messages: list[dict], receive):
    async def replayed() -> dict:
        return messages.pop(0) if messages else await receive()

    return replayed
