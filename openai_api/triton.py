"""The `internvl` ensemble over gRPC bidirectional streaming (one request per stream call), with
errors classified into HTTP statuses: request errors 400, Triton unreachable 503, the rest 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import grpc
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from engine.protocol import input_array, is_request_error, stop_request, strip_error_prefix
from openai_api.errors import APIError

HEALTH_TIMEOUT = 2.0  # seconds, for liveness / readiness / config calls
STOP_TIMEOUT = 5.0  # seconds for the stop request of a client that went away
# A finished call is closed, not cancelled: tritonserver 2.51 keeps ~100 KiB per ensemble stream that is
# cancelled after its final response (measured in docs/API.md "Load and soak"); cancelling is for early exits.
CLOSE_TIMEOUT = 5.0

# Fields: input name -> (Triton dtype, values of the one request, without the batch dim)
Fields = dict[str, tuple[str, list]]


@dataclass(frozen=True)
class Reply:
    """One response of the ensemble: text deltas and the counts so far."""

    content: str
    reasoning: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last response
    logprobs: tuple[dict, ...] = ()  # with logprobs: OpenAI's entry for each token this response brings


def unreachable(url: str, detail: str = "") -> APIError:
    return APIError(503, f"Triton is not reachable at {url}" + (f": {detail}" if detail else ""))


def triton_error(message: str) -> APIError:
    return APIError(400 if is_request_error(message) else 500, strip_error_prefix(message))


class TritonBackend:
    """Triton's gRPC service through its generated stub (tritonclient.grpc.service_pb2_grpc, public):
    tritonclient.grpc.aio's stream_infer refuses the reserved `triton_enable_empty_final_response`
    parameter the streams need."""

    def __init__(self, url: str, model: str = "internvl"):
        self.url, self.model = url, model
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._stopping: set[asyncio.Task] = set()  # stop requests in flight (kept from garbage collection)

    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        # grpc.aio channels belong to the event loop they were made in: made on first use, in the server's loop.
        if self._stub is None:
            unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            self._channel = grpc.aio.insecure_channel(self.url, options=unlimited)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def ready(self) -> bool:
        try:
            live = await self.stub().ServerLive(service_pb2.ServerLiveRequest(), timeout=HEALTH_TIMEOUT)
            if not live.live:
                return False
            ready = await self.stub().ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=HEALTH_TIMEOUT)
            return ready.ready
        except grpc.aio.AioRpcError:
            return False

    async def preprocess_parameters(self) -> dict[str, str] | None:
        """The `preprocess` model's config parameters (checkpoint, limits); None while Triton does not answer."""
        try:
            response = await self.stub().ModelConfig(service_pb2.ModelConfigRequest(name="preprocess"), timeout=HEALTH_TIMEOUT)
        except grpc.aio.AioRpcError:
            return None
        return {key: value.string_value for key, value in response.config.parameters.items()}

    async def checkpoint_name(self) -> str | None:
        """The checkpoint directory's name, from the `preprocess` model's `checkpoint` parameter ("" when
        it has none); None while Triton does not answer."""
        parameters = await self.preprocess_parameters()
        if parameters is None:
            return None
        return PurePosixPath(parameters.get("checkpoint", "").rstrip("/")).name

    async def stream(self, fields: Fields, request_id: str) -> AsyncIterator[Reply]:
        """The ensemble's responses; closing this generator early cancels the gRPC call and sends the
        llm model's stop request, which frees the request's engine slot."""
        call = self.stub().ModelStreamInfer(iter([_request(self.model, request_id, fields)]))
        finished = False
        try:
            async for response in call:
                if response.error_message:
                    finished = True
                    raise triton_error(response.error_message)
                infer = response.infer_response
                if infer.outputs:
                    yield _reply(InferResult(infer))
                if infer.parameters["triton_final_response"].bool_param:
                    finished = True
                    return
            raise APIError(500, "the Triton stream ended before the final response")
        except grpc.aio.AioRpcError as e:
            finished = True
            raise _rpc_error(e, self.url) from None
        finally:
            if finished:
                await _close(call)
            else:  # Triton does not cancel the running llm step of an ensemble: stop it
                call.cancel()
                task = asyncio.get_running_loop().create_task(self._stop(request_id))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    async def _stop(self, request_id: str) -> None:
        """Sends the llm model's stop request (engine/protocol.py stop_request) for request_id."""
        model, inputs, _ = stop_request(request_id)
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        for name, dtype, array in inputs:
            request.inputs.add(name=name, datatype=dtype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        call = self.stub().ModelStreamInfer(iter([request]))
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                async for response in call:  # the stop request's one (empty, final) response
                    break
        except (grpc.aio.AioRpcError, TimeoutError):
            pass  # the server or the request is gone already
        finally:
            call.cancel()


async def _close(call) -> None:
    """Waits for the server to end a call whose final response came (our request stream is already
    closed, so it ends at once); cancels it only if it does not end in time."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await call.code()
    except TimeoutError:
        call.cancel()


def _request(model: str, request_id: str, fields: Fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    for name, (dtype, values) in fields.items():
        array = input_array(dtype, values)
        request.inputs.add(name=name, datatype=dtype, shape=array.shape)
        request.raw_input_contents.append(serialize_byte_tensor(array).item() if dtype == "BYTES" else array.tobytes())
    return request


def _reply(result: InferResult) -> Reply:
    def text(name: str) -> str:
        array = result.as_numpy(name)
        return "" if array is None else b"".join(array.reshape(-1)).decode("utf-8")

    def count(name: str) -> int:
        array = result.as_numpy(name)
        return 0 if array is None else int(array.reshape(-1)[0])

    return Reply(
        text("content_output"),
        text("reasoning_output"),
        count("prompt_tokens"),
        count("completion_tokens"),
        text("finish_reason"),
        _logprobs(result),
    )


def _logprobs(result: InferResult) -> tuple[dict, ...]:
    """The ensemble's per-token log probabilities as OpenAI's chat logprobs `content` entries."""
    logprobs = result.as_numpy("output_log_probs")
    if logprobs is None or not logprobs.size:
        return ()
    tokens = result.as_numpy("output_tokens")[0]  # [n] bytes
    top_tokens, top_logprobs = result.as_numpy("top_tokens")[0], result.as_numpy("top_log_probs")[0]  # [n, k]
    return tuple(
        {**_entry(token, logprob), "top_logprobs": [_entry(t, v) for t, v in zip(top_tokens[i], top_logprobs[i])]}
        for i, (token, logprob) in enumerate(zip(tokens, logprobs[0]))
    )


def _entry(token: bytes, logprob) -> dict:
    return {"token": token.decode("utf-8"), "logprob": float(logprob), "bytes": list(token)}


def _rpc_error(error: grpc.aio.AioRpcError, url: str) -> APIError:
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return unreachable(url, error.details())
    status = 400 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 500
    return APIError(status, f"Triton: {error.code().name}: {error.details()}")
