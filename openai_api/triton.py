"""The `internvl` ensemble over gRPC bidirectional streaming (one request per stream call), with
errors classified into HTTP statuses: request errors 400, Triton unreachable 503, the rest 500."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from client.triton_client import stop_request
from engine.protocol import is_request_error, strip_error_prefix
from openai_api.errors import APIError

HEALTH_TIMEOUT = 2.0  # seconds, for liveness / readiness / config calls
STOP_TIMEOUT = 5.0  # seconds for the stop request of a client that went away
# A finished call is closed, not cancelled: tritonserver 2.51 keeps ~100 KiB per ensemble stream that is
# cancelled after its final response (measured in docs/API.md "Load and soak"); cancelling is for early exits.
CLOSE_TIMEOUT = 5.0

# Fields: input name -> (Triton dtype, values of the one request, without the batch dim)
Fields = dict[str, tuple[str, list]]

_NUMPY = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}


@dataclass(frozen=True)
class Reply:
    """One response of the ensemble: text deltas and the counts so far."""

    content: str
    reasoning: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "" until the last response


def triton_error(message: str) -> APIError:
    return APIError(400 if is_request_error(message) else 500, strip_error_prefix(message))


class TritonBackend:
    def __init__(self, url: str, model: str = "internvl"):
        self.url, self.model = url, model
        self._client: InferenceServerClient | None = None
        self._stopping: set[asyncio.Task] = set()  # stop requests in flight (kept from garbage collection)

    def client(self) -> InferenceServerClient:
        # grpc.aio channels belong to the event loop they were made in: made on first use, in the server's loop.
        if self._client is None:
            self._client = InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        try:
            client = self.client()
            return await client.is_server_live(client_timeout=HEALTH_TIMEOUT) and await client.is_model_ready(
                self.model, client_timeout=HEALTH_TIMEOUT
            )
        except InferenceServerException:
            return False

    async def checkpoint_name(self) -> str | None:
        """The checkpoint directory's name, from the `preprocess` model's `checkpoint` parameter."""
        try:
            response = await self.client().get_model_config("preprocess", client_timeout=HEALTH_TIMEOUT)
        except InferenceServerException:
            return None
        path = response.config.parameters["checkpoint"].string_value.rstrip("/")
        return PurePosixPath(path).name or None

    async def stream(self, fields: Fields, request_id: str) -> AsyncIterator[Reply]:
        """The ensemble's responses; closing this generator early cancels the gRPC call and sends the
        llm model's stop request, which frees the request's engine slot."""
        # tritonclient.grpc.aio's stream_infer refuses the reserved `triton_enable_empty_final_response`
        # parameter, so the request goes through the same generated stub that client wraps.
        call = self.client()._client_stub.ModelStreamInfer(iter([_request(self.model, request_id, fields)]))
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
            raise _rpc_error(e) from None
        finally:
            if finished:
                await _close(call)
            else:  # Triton does not cancel the running llm step of an ensemble: stop it
                call.cancel()
                task = asyncio.get_running_loop().create_task(self._stop(request_id))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    async def _stop(self, request_id: str) -> None:
        """Sends the llm model's stop request (client/triton_client.py stop_request) for request_id."""
        model, inputs, _ = stop_request(request_id)
        request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        for name, dtype, array in inputs:
            request.inputs.add(name=name, datatype=dtype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        call = self.client()._client_stub.ModelStreamInfer(iter([request]))
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
        array = np.array([values], dtype=object if dtype == "BYTES" else _NUMPY[dtype])
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
        text("content_output"), text("reasoning_output"), count("prompt_tokens"), count("completion_tokens"), text("finish_reason")
    )


def _rpc_error(error: grpc.aio.AioRpcError) -> APIError:
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, f"Triton is not reachable: {error.details()}")
    status = 400 if error.code() == grpc.StatusCode.INVALID_ARGUMENT else 500
    return APIError(status, f"Triton: {error.code().name}: {error.details()}")
