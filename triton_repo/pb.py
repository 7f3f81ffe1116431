"""Helpers shared by the python-backend adapters (importable only inside Triton's python stub).

Every tensor carries a leading request-batch dimension (the ensemble and every model but preprocess
have max_batch_size > 0, like tensorrtllm_backend's; preprocess declares that dimension itself); a
request must hold exactly one item in it.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.protocol import score_outputs


def model_parameters(args: dict) -> tuple[dict, dict[str, str]]:
    """-> (model config, its `parameters` as plain strings)."""
    config = json.loads(args["model_config"])
    return config, {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def output_dtypes(config: dict) -> dict[str, np.dtype]:
    """config.pbtxt is the source of truth for dtypes."""
    return {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}


def item(request, name: str, required: bool = True) -> np.ndarray | None:
    """The request's single batch item of input `name`, or None when an optional input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"input {name!r} is required")
        return None
    array = tensor.as_numpy()
    if array.shape[0] != 1:
        raise ValueError(f"input {name!r}: send one request per call (batch size 1), got {array.shape[0]}")
    return array[0]


REQUIRED = object()


def scalar(request, name: str, default=REQUIRED):
    value = item(request, name, required=default is REQUIRED)
    if value is None:
        return default
    if value.size != 1:
        raise ValueError(f"input {name!r} must hold one value, got shape {list(value.shape)}")
    value = value.reshape(())[()]
    return utf8(value, name) if isinstance(value, bytes) else value.item()


def utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input {name!r} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def strings(request, name: str) -> list[bytes]:
    value = item(request, name, required=False)
    return [] if value is None else [bytes(v) for v in value.reshape(-1)]


def answer_each(requests, handle) -> list[pb_utils.InferenceResponse]:
    """handle(request) -> response for each request; an exception fails only its own request."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except Exception as error:  # noqa: BLE001 — one bad request must not fail the others
            responses.append(error_response(error))
    return responses


def error_response(error: Exception) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(error).__name__}: {error}"))


def tensor(name: str, array: np.ndarray, dtype: np.dtype) -> pb_utils.Tensor:
    """An output tensor for one request: adds the batch dimension."""
    return pb_utils.Tensor(name, np.asarray(array, dtype=dtype)[None])


# The llm step (CPU engine or the GPU wrapper over tensorrt_llm) answers every response with these,
# because a step after a decoupled model may read only that model's outputs.
def stream_echo(request, default_key: str, prompt_tokens: int) -> dict[str, np.ndarray]:
    """What postprocess needs per stream, echoed in each llm response: the request_key, the
    stop_words_list, whether the prompt opened the reasoning, and the prompt's token count."""
    stop_words = item(request, "stop_words_list", required=False)
    return {
        "request_key": np.array([scalar(request, "request_key", default_key).encode()]),
        "stop_words_list": np.zeros((2, 0), np.int32) if stop_words is None else stop_words,
        "opens_reasoning": np.array([bool(scalar(request, "opens_reasoning", False))]),
        "prompt_tokens": np.array([prompt_tokens], np.int32),
    }


def llm_response(
    dtypes: dict, tokens, finish_reason: str | None, echo: dict[str, np.ndarray], scores: dict[str, np.ndarray] | None = None
) -> pb_utils.InferenceResponse:
    """One llm response: new tokens, their count, is_final, finish_reason ("" until the final
    response, then "stop" | "length"), the stream's echo and the tokens' log probabilities (scores:
    output_log_probs [n], cum_log_probs [1], top_log_probs [n, k], top_token_ids [n, k]; empty
    arrays, engine/protocol.py score_outputs(), when the request did not ask)."""
    return pb_utils.InferenceResponse(
        [
            *(tensor(name, value, dtypes[name]) for name, value in (scores or score_outputs()).items()),
            tensor("output_ids", tokens, dtypes["output_ids"]),
            tensor("sequence_length", [len(tokens)], dtypes["sequence_length"]),
            tensor("is_final", [finish_reason is not None], dtypes["is_final"]),
            tensor("finish_reason", [(finish_reason or "").encode()], dtypes["finish_reason"]),
            *(tensor(name, value, dtypes[name]) for name, value in echo.items()),
        ]
    )


def stop_by_request_id(request, sender, cancel) -> None:
    """A `stop` request: cancel(its Triton request id) ends the live requests sent with that id (as
    TensorRT-LLM's tensorrt_llm model does with its `stop` input); answered with an empty final response."""
    request_id = request.request_id()
    if not request_id:
        raise ValueError("a stop request needs the request id of the request to stop")
    cancel(request_id)
    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def decoupled_output_dtypes(config: dict, model: str) -> dict[str, np.dtype]:
    if not pb_utils.using_decoupled_model_transaction_policy(config):
        raise ValueError(f"the {model} model must be decoupled (model_transaction_policy {{ decoupled: true }})")
    return output_dtypes(config)
