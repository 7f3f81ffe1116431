"""Errors as OpenAI reports them: {"error": {"message", "type", "param", "code"}} with the HTTP
status in `code`; the openai SDK raises BadRequestError, NotFoundError, ... from the status."""

from __future__ import annotations

from starlette.responses import JSONResponse

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "APIError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def as_api_error(error: Exception) -> APIError:
    """Anything unexpected is a 500 that still has OpenAI's error shape."""
    return error if isinstance(error, APIError) else APIError(500, f"{type(error).__name__}: {error}")


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error as an HTTP response (also an ASGI app, for the middlewares)."""
    return JSONResponse(error.body(), status_code=error.status, headers=headers)
