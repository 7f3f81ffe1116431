"""The FastAPI app: POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from openai_api.auth import ApiKeyCheck
from openai_api.body_limit import BodyLimit
from openai_api.conversation import build_conversation
from openai_api.errors import APIError, as_api_error, error_response
from openai_api.images import ImageLoader
from openai_api.inputs import check_values, ensemble_fields
from openai_api.limits import RequestLimits, TritonLimits
from openai_api.schema import ChatCompletionRequest
from openai_api.settings import Settings
from openai_api.triton import Reply, TritonBackend, unreachable

FALLBACK_MODEL_NAME = "internvl"  # a preprocess config without a checkpoint parameter
log = logging.getLogger("openai_api")
OWNER = "internvl-serve"
T = TypeVar("T")


class EventStream(StreamingResponse):
    """Server-sent events whose generators (the events and the Triton stream under them) are closed
    however the response ends (finished, client gone, server stopping), so the Triton call is
    cancelled at once, also when the events never started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], upstream: AsyncGenerator):
        super().__init__(events)
        self.upstream = upstream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.upstream.aclose()


async def unless_disconnected(request: Request, work: Coroutine[None, None, T]) -> T:
    """Runs `work` (waiting on Triton), cancelled if the client goes away first: Starlette does not
    cancel a handler whose client left."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no-op once done
    if task not in done:
        raise APIError(499, "the client closed the request")
    return task.result()


def create_app(settings: Settings, backend=None) -> FastAPI:
    """backend: a TritonBackend-like object (tests inject a fake); default: Triton at settings.triton_url."""
    backend = backend or TritonBackend(settings.triton_url, settings.triton_model)
    loader = ImageLoader(settings)
    limits = TritonLimits(backend)
    started = int(time.time())
    resolved: list[str] = [settings.served_model_name] if settings.served_model_name else []

    async def model_name() -> str:
        # Asked until Triton answers: the server may start before Triton has loaded the models. Until
        # then the served name is unknown, so every route that names it is a 503 naming Triton's address.
        if not resolved:
            name = await backend.checkpoint_name()
            if name is None:
                raise unreachable(backend.url)
            resolved.append(name or FALLBACK_MODEL_NAME)
        return resolved[0]

    async def request_limits() -> RequestLimits:
        if (known := await limits.get()) is None:
            raise unreachable(backend.url)
        return known

    async def body_limit() -> int | None:
        if settings.max_request_bytes is not None:
            return settings.max_request_bytes
        known = await limits.get()
        return known and known.body_bytes

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not await backend.ready():  # said once; the routes answer 503 until Triton does
            log.warning("Triton is not reachable at %s (or its %r model is not ready): requests get 503 until it is", backend.url, backend.model)
        yield
        await backend.close()

    app = FastAPI(title="internvl-serve OpenAI-compatible API", lifespan=lifespan)

    unknown = unreachable(backend.url, "the request size limit is unknown until it answers (--max-request-bytes sets one)").message
    app.add_middleware(BodyLimit, limit=body_limit, unknown=unknown)
    if settings.api_keys:  # added last: runs first, so no body is read for a request without a key
        app.add_middleware(ApiKeyCheck, keys=settings.api_keys)

    async def api_error(request, error: Exception):
        return error_response(as_api_error(error))

    async def schema_error(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is ("body", <byte offset>): not a field
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            return error_response(APIError(422, f"the request body is not valid JSON: {reason} (at byte {first['loc'][-1]})"))
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None  # without "body"
        message = f"{where}: {first.get('msg', 'invalid request body')}" if where else first.get("msg", "invalid request body")
        return error_response(APIError(422, message, where))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, schema_error)
    app.add_exception_handler(Exception, api_error)  # Starlette logs these (unexpected) with their traceback

    @app.get("/health")
    async def health():
        if await backend.ready():
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/v1/models")
    async def models():
        card = {"id": await model_name(), "object": "model", "created": started, "owned_by": OWNER}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        name = await model_name()
        if body.model != name:
            raise APIError(404, f"The model `{body.model}` does not exist.", "model")
        check_values(body)
        conversation = build_conversation(body.messages)
        limits = await request_limits()
        images = await loader.load(conversation.images, limits)
        video = await loader.load_video(conversation.video, limits) if conversation.video else None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        fields = ensemble_fields(body, conversation, images, stream=body.stream, video=video)
        replies = backend.stream(fields, completion_id)
        head = Completion(completion_id, name, int(time.time()))
        if not body.stream:
            return head.whole(await unless_disconnected(request, _collect(replies)), bool(body.logprobs))
        # The first response decides the HTTP status: request errors come before any token.
        first = await unless_disconnected(request, _first(replies))
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(head.events(first, replies, usage, bool(body.logprobs)), replies)

    return app


class Completion:
    def __init__(self, completion_id: str, model: str, created: int):
        self.id, self.model, self.created = completion_id, model, created

    def whole(self, replies: list[Reply], logprobs: bool) -> dict:
        content = "".join(r.content for r in replies)
        reasoning = "".join(r.reasoning for r in replies)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        scores = {"content": [entry for r in replies for entry in r.logprobs]} if logprobs else None
        choice = {"index": 0, "message": message, "logprobs": scores, "finish_reason": _finish(replies)}
        return {**self._head("chat.completion"), "choices": [choice], "usage": _usage(replies)}

    async def events(self, first: Reply | None, rest: AsyncIterator[Reply], include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
        """Server-sent chunks; with logprobs each chunk carries the entries of the tokens it brings
        (a token whose text is still held back comes in a chunk with an empty delta)."""
        replies = [first] if first else []
        async with contextlib.aclosing(rest):
            yield self._chunk({"role": "assistant", "content": ""})
            try:
                if first:
                    if (delta := _delta(first)) or first.logprobs:
                        yield self._chunk(delta, logprobs=first.logprobs if logprobs else None)
                async for reply in rest:
                    replies.append(reply)
                    if (delta := _delta(reply)) or reply.logprobs:
                        yield self._chunk(delta, logprobs=reply.logprobs if logprobs else None)
            except Exception as error:
                yield _event(as_api_error(error).body())
                yield "data: [DONE]\n\n"
                return
        yield self._chunk({}, _finish(replies))
        if include_usage:
            yield _event({**self._head("chat.completion.chunk"), "choices": [], "usage": _usage(replies)})
        yield "data: [DONE]\n\n"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None, logprobs: tuple[dict, ...] | None = None) -> str:
        scores = None if logprobs is None else {"content": list(logprobs)}
        choice = {"index": 0, "delta": delta, "logprobs": scores, "finish_reason": finish_reason}
        return _event({**self._head("chat.completion.chunk"), "choices": [choice]})


async def _collect(replies: AsyncGenerator[Reply, None]) -> list[Reply]:
    async with contextlib.aclosing(replies):
        return [reply async for reply in replies]


async def _first(replies: AsyncIterator[Reply]) -> Reply | None:
    try:
        return await anext(replies)
    except StopAsyncIteration:
        return None


def _delta(reply: Reply) -> dict:
    delta = {}
    if reply.reasoning:
        delta["reasoning_content"] = reply.reasoning
    if reply.content:
        delta["content"] = reply.content
    return delta


def _finish(replies: list[Reply]) -> str:
    return next((r.finish_reason for r in reversed(replies) if r.finish_reason), "stop")


def _usage(replies: list[Reply]) -> dict:
    last = replies[-1] if replies else Reply("", "", 0, 0, "")
    total = last.prompt_tokens + last.completion_tokens
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens, "total_tokens": total}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
