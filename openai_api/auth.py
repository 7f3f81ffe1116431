"""API keys: a pure ASGI middleware that answers every /v1/* request without one of the configured
keys (`Authorization: Bearer <key>`, as the openai SDK sends its api_key) with a 401 in OpenAI's error
shape, before the body is read or Triton is asked anything. Other paths (/health) stay open."""

from __future__ import annotations

import hmac

from openai_api.errors import APIError, error_response

_CHALLENGE = {"WWW-Authenticate": "Bearer"}  # RFC 6750


class ApiKeyCheck:
    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, [key.encode() for key in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _guarded(scope["path"]):
            refusal = self._refusal(dict(scope["headers"]).get(b"authorization", b""))
            if refusal:
                return await error_response(refusal, _CHALLENGE)(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, authorization: bytes) -> APIError | None:
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return APIError(401, "no API key: send it as the header `Authorization: Bearer <key>` (the openai SDK's api_key)")
        # Every key is compared, in constant time, so the time taken tells nothing about which came close.
        if not any([hmac.compare_digest(token.strip(), key) for key in self.keys]):
            return APIError(401, "incorrect API key")
        return None


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")
