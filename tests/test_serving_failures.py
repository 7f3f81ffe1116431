"""Through the real tritonserver: one request's failure inside the llm step ends that request only
(issue 10, item 1) — sampling values that would overflow, an end_id outside the vocabulary."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from client.triton_client import InternVLClient
from engine.config import ModelConfig
from engine.pipeline import Pipeline

HEALTHY_TOKENS = 60


@pytest.fixture(scope="module")
def pipe(tiny) -> Pipeline:
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipe:
        yield pipe


def _llm_request(url: str, inputs: dict[str, np.ndarray]) -> list:
    """A direct streaming request to the `llm` model -> its responses' (output_ids or error message)."""
    import tritonclient.grpc as grpcclient

    dtypes = {np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.float32): "FP32"}
    tensors = []
    for name, value in inputs.items():
        value = np.asarray(value)[None]
        tensor = grpcclient.InferInput(name, list(value.shape), dtypes[value.dtype])
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("llm", tensors, enable_empty_final_response=True)
        out = []
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                return out + [error.message()]
            if result.as_numpy("output_ids") is not None:
                out.append(result.as_numpy("output_ids")[0].tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def test_one_requests_sampling_or_end_id_error_does_not_fail_the_streams_in_flight(server, pipe, tiny):
    vocab = ModelConfig.from_pretrained(tiny).text.vocab_size
    client = InternVLClient(server.grpc_url)
    healthy = dict(max_tokens=HEALTHY_TOKENS, min_tokens=HEALTHY_TOKENS)
    bad_end_id = {
        "input_ids": np.array([5, 6, 7, 8], np.int32),
        "input_lengths": np.array([4], np.int32),
        "request_output_len": np.array([8], np.int32),
        "end_id": np.array([vocab + 3], np.int32),
        "min_tokens": np.array([2], np.int32),
        "streaming": np.array([True]),
    }
    with ThreadPoolExecutor(4) as pool:
        streamed = pool.submit(lambda: list(client.stream("Tell me a story.", keep_empty=True, **healthy)))
        penalty = pool.submit(_raw_generate, server, {"text_input": "Hi", "max_tokens": 20, "temperature": 1.0, "repetition_penalty": 1e-38})
        tiny_temperature = pool.submit(client.chat, "Hi", stream=True, max_tokens=20, temperature=1e-38, seed=1)
        end_id = pool.submit(_llm_request, server.grpc_url, bad_end_id)
        assert "repetition_penalty must be in [0.001, 1000] (1 = off), got 1e-38" in penalty.result()
        assert end_id.result() == [f"ValueError: stop token id {vocab + 3} is not in the vocabulary [0, {vocab})"]
        assert len(tiny_temperature.result()) > 0  # clamped to a finite temperature: it answers
        deltas = streamed.result()
    assert len(deltas) == HEALTHY_TOKENS  # one response per token: the healthy stream ran to the end
    assert "".join(deltas) == pipe.chat("Tell me a story.", max_new_tokens=HEALTHY_TOKENS, min_new_tokens=HEALTHY_TOKENS)
    assert server.ready()


def _raw_generate(server, body: dict) -> str:
    """Raw JSON to the ensemble's generate endpoint (the clients refuse bad values before sending)
    -> the server's error message."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internvl/generate", json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=120)
    return json.loads(error.value.read())["error"]


def test_negative_temperature_is_an_error_not_greedy(server):
    message = _raw_generate(server, {"text_input": "Hi", "max_tokens": 4, "temperature": -1.0})
    assert "temperature must be ≥ 0 (0 = greedy), got -1" in message
