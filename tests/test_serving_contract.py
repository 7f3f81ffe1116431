"""The ensemble's contract through a real tritonserver (issue 13): the counts and finish reason of
every reply, thinking mode, one clear error per bad request while good ones run on, and a client
that goes away freeing its engine slot."""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient, ServerError
from engine.pipeline import Pipeline
from engine.protocol import is_request_error
from openai_api.server import running_server
from openai_api.settings import Settings
from tests.repository_checks import metric_value

IMAGES = [synthetic_image(11, 640, 400, "PNG"), synthetic_image(12, 300, 800, "JPEG")]


@pytest.fixture(scope="module")
def pipe(tiny) -> Pipeline:
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipe:
        yield pipe


@pytest.mark.parametrize("protocol,stream", [("grpc", True), ("grpc", False), ("http", True), ("http", False)])
def test_replies_report_prompt_and_completion_tokens_and_the_finish_reason(server, pipe, protocol, stream):
    client = InternVLClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol=protocol)
    long = pipe.generate("Describe the image.", [IMAGES[0]], max_new_tokens=14)
    assert long.finish_reason == "length"
    stop_word = long.text.split()[len(long.text.split()) // 2]
    cases = [  # (kwargs for both, reference)
        (dict(max_tokens=14), long),
        (dict(max_tokens=40, stop=[stop_word]), pipe.generate("Describe the image.", [IMAGES[0]], max_new_tokens=40, stop=[stop_word])),
    ]
    for kwargs, expected in cases:
        reply = client.generate("Describe the image.", [IMAGES[0]], stream=stream, **kwargs)
        assert (reply.text, reply.prompt_tokens, reply.finish_reason) == (expected.text, expected.prompt_tokens, expected.finish_reason)
        if expected.finish_reason == "length":  # a stop string may cut the text before the last token
            assert reply.completion_tokens == len(expected.token_ids) == 14
    assert cases[1][1].finish_reason == "stop"
    text_only = client.generate("Hello", stream=stream, max_tokens=5)
    assert text_only.prompt_tokens == pipe.generate("Hello", max_new_tokens=5).prompt_tokens < long.prompt_tokens


def test_max_tokens_absent_runs_to_a_stop_and_beyond_the_context_is_refused(server, pipe):
    client = InternVLClient(server.grpc_url)
    reference = pipe.generate("Tell me a story.", max_new_tokens=30)
    stop_word = reference.text.split()[-2]
    expected = pipe.generate("Tell me a story.", max_new_tokens=30, stop=[stop_word])
    reply = client.generate("Tell me a story.", stream=True, max_tokens=None, stop=[stop_word])
    assert (reply.text, reply.finish_reason) == (expected.text, "stop")
    with pytest.raises(ServerError, match=r"max_tokens \+ the prompt's \d+ tokens must fit this deployment's context of \d+ tokens"):
        client.chat("Tell me a story.", max_tokens=10_000_000)


def test_thinking_mode_uses_the_cards_system_prompt(server, pipe):
    client = InternVLClient(server.grpc_url)
    thinking = pipe.generate("Describe the image.", [IMAGES[1]], max_new_tokens=12, enable_thinking=True)
    plain = pipe.generate("Describe the image.", [IMAGES[1]], max_new_tokens=12)
    assert thinking.text != plain.text and thinking.prompt_tokens > plain.prompt_tokens
    reply = client.generate("Describe the image.", [IMAGES[1]], stream=True, max_tokens=12, extra={"enable_thinking": ("BOOL", True)})
    assert (reply.text, reply.prompt_tokens) == (thinking.text, thinking.prompt_tokens)
    assert (reply.content, reply.reasoning or None) == (thinking.content, thinking.reasoning_content)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width × height (its pixel data is a 1×1 image's)."""
    png = bytearray(synthetic_image(0, 1, 1, "PNG"))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    png[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr : ihdr + 17])))
    return bytes(png)


BAD_UTF8 = b"caf\xe9"
# name: (question, images, fields as (dtype, value), expected error)
BAD = {
    "temperature-negative": ("Hi", [], {"temperature": ("FP32", -1.0)}, "temperature must be ≥ 0"),
    "temperature-nan": ("Hi", [], {"temperature": ("FP32", float("nan"))}, "temperature must be ≥ 0 .*got nan"),
    "temperature-inf": ("Hi", [], {"temperature": ("FP32", float("inf"))}, "temperature must be a finite number"),
    "top-p-above-1": ("Hi", [], {"top_p": ("FP32", 1.5)}, r"top_p must be in \[0, 1\]"),
    "top-p-negative": ("Hi", [], {"top_p": ("FP32", -0.1)}, r"top_p must be in \[0, 1\]"),
    "top-k-negative": ("Hi", [], {"top_k": ("INT32", -1)}, "top_k must be ≥ 0"),
    "repetition-penalty-0": ("Hi", [], {"repetition_penalty": ("FP32", 0.0)}, "repetition_penalty must be in"),
    "repetition-penalty-negative": ("Hi", [], {"repetition_penalty": ("FP32", -2.0)}, "repetition_penalty must be in"),
    "max-tokens-0": ("Hi", [], {"max_tokens": ("INT32", 0)}, "max_tokens must be ≥ 1"),
    "max-tokens-negative": ("Hi", [], {"max_tokens": ("INT32", -5)}, "max_tokens must be ≥ 1"),
    "max-tokens-beyond-context": ("Hi", [], {"max_tokens": ("INT32", 10_000_000)}, "must fit this deployment's context"),
    "min-tokens-negative": ("Hi", [], {"min_tokens": ("INT32", -1)}, "min_tokens must be ≥ 0"),
    "max-tiles-0": ("Hi", [IMAGES[0]], {"max_tiles": ("INT32", 0)}, r"max_tiles must be in \[1, "),
    "max-tiles-99": ("Hi", [IMAGES[0]], {"max_tiles": ("INT32", 99)}, r"max_tiles must be in \[1, "),
    "corrupt-image": ("Hi", [b"\x89PNG\r\n\x1a\n" + b"\x00" * 64], {}, "cannot decode image"),
    "empty-image": ("Hi", [b""], {}, r"image is empty \(0 bytes\)"),
    "text-as-image": ("Hi", [b"hello there"], {}, "not a recognised image format"),
    "too-many-images": ("Hi", IMAGES + IMAGES[:1], {}, "the request has 3 images; this deployment allows 2"),
    "decompression-bomb": ("Hi", [png_header(9000, 9000)], {}, "9000×9000 is 81000000 pixels; this deployment allows 40000000"),
    "request-too-large": ("Hi", [b"\xff" * (9 * 2**20)], {}, "hold 9437184 bytes; this deployment allows 8388608"),
    "more-tags-than-images": ("<image>\n<image>\nCompare.", IMAGES[:1], {}, "2 <image> tag.* but the request has 1 image"),
    "fewer-tags-than-images": ("Image-1: <image>\nDescribe.", IMAGES, {}, "1 <image> tag.* but the request has 2 image"),
    "tags-without-images": ("<image>\nDescribe.", [], {}, "1 <image> tag.* but the request has 0 image"),
    "history-not-json": ("Hi", [], {"history": ("BYTES", "[[not json")}, "history must be a JSON list"),
    "history-wrong-shape": ("Hi", [], {"history": ("BYTES", '[["only one"]]')}, "history must be a JSON list of .* pairs"),
    "history-not-strings": ("Hi", [], {"history": ("BYTES", "[[1, 2]]")}, "history must be a JSON list of .* pairs"),
    "text-not-utf8": (BAD_UTF8, [], {}, r"input 'text_input' is not valid UTF-8"),
    "system-prompt-not-utf8": ("Hi", [], {"system_prompt": ("BYTES", BAD_UTF8)}, r"input 'system_prompt' is not valid UTF-8"),
    "stop-words-not-utf8": ("Hi", [], {"stop_words": ("BYTES", [BAD_UTF8])}, r"input 'stop_words' is not valid UTF-8"),
    "prompt-too-long": (" ".join(["word"] * 6000), [], {}, r"the prompt has \d+ tokens; this deployment allows \d+"),
}
# raw Triton requests the client would not build: name -> (inputs as (name, dtype, array), expected error)
RAW = {
    # preprocess reports it, also when the request carries none of its inputs (max_tokens goes to llm)
    "missing-text-input": ([("image_bytes", "BYTES", np.array([[IMAGES[0]]], object))], "input 'text_input' is required"),
    "only-max-tokens": ([("max_tokens", "INT32", np.array([[4]], np.int32))], "input 'text_input' is required"),
    "max-tokens-as-float": (
        [("text_input", "BYTES", np.array([[b"Hi"]], object)), ("max_tokens", "FP32", np.array([[4.0]], np.float32))],
        "max_tokens",
    ),
    "two-texts": ([("text_input", "BYTES", np.array([[b"Hi", b"there"]], object))], "text_input"),
    "unknown-input": ([("text_input", "BYTES", np.array([[b"Hi"]], object)), ("colour", "INT32", np.array([[1]], np.int32))], "colour"),
    "seed-as-int64": (
        [("text_input", "BYTES", np.array([[b"Hi"]], object)), ("random_seed", "INT64", np.array([[3]], np.int64))],
        "random_seed",
    ),
}


def _raw(url: str, inputs) -> str:
    """Sends one raw request on a stream -> the error message it gets (fails if it gets none)."""
    import queue

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        tensors = []
        for name, dtype, array in inputs:
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.async_stream_infer("internvl", tensors, enable_empty_final_response=True)
        _, error = results.get(timeout=60)
        assert error is not None, "the request was accepted"
        return error.message()
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def test_every_bad_request_gets_its_error_while_concurrent_good_ones_succeed(server, pipe):
    client = InternVLClient(server.grpc_url, check_sampling=False)
    good = ("Describe the image.", [IMAGES[1]])
    expected = pipe.chat(*good, max_new_tokens=24)
    assert expected != pipe.chat("Describe the image.", [IMAGES[0]], max_new_tokens=24)

    def bad(case):
        question, images, fields, _ = BAD[case]
        try:
            reply = client.chat("", images, stream=True, max_tokens=8, extra={"text_input": ("BYTES", question), **fields})
        except ServerError as error:
            return str(error)
        return f"accepted: {reply!r}"

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(client.chat, *good, stream=True, max_tokens=24) for _ in range(4)]
        bads = {case: pool.submit(bad, case) for case in BAD}
        raws = {case: pool.submit(_raw, server.grpc_url, inputs) for case, (inputs, _) in RAW.items()}
        answers = {case: f.result() for case, f in {**bads, **raws}.items()}
        assert [g.result() for g in goods] == [expected] * 4
    assert len(answers) >= 30
    for case, answer in answers.items():
        pattern = BAD[case][3] if case in BAD else RAW[case][1]
        assert re.search(pattern, answer), f"{case}: {answer}"
        assert is_request_error(answer), f"{case} is not classified as the request's error: {answer}"
    assert server.ready()
    assert client.chat(*good, max_tokens=24) == expected


def _openai_stream(url: str):
    """Lines of a streamed chat completion over plain HTTP (closing it drops the connection)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 3000, "stream": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=60)
    try:
        yield from response
    finally:
        response.close()


@pytest.mark.parametrize("via", ["grpc", "openai-sse"])
def test_a_client_that_goes_away_frees_its_engine_slot_within_a_second(server, via):
    aborted = metric_value(server, "internvl_llm_aborted_total")
    with running_server(Settings(triton_url=server.grpc_url, port=0, served_model_name="tiny")) as url:
        if via == "grpc":
            stream = InternVLClient(server.grpc_url).stream("Tell me a very long story.", keep_empty=True, max_tokens=3000)
        else:
            stream = _openai_stream(url)
        for _ in range(4):
            next(stream)
        assert metric_value(server, "internvl_llm_requests_in_flight") == 1
        stream.close()  # drops the gRPC stream / the HTTP connection
        closed = time.monotonic()
        _wait_until_freed(server, aborted, closed)


def _wait_until_freed(server, aborted: float, closed: float) -> None:
    while time.monotonic() - closed < 1.0:
        if metric_value(server, "internvl_llm_aborted_total") == aborted + 1 and metric_value(server, "internvl_llm_requests_in_flight") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the request still holds its engine slot one second after its client went away")


@pytest.mark.parametrize(
    "body, status, message",
    [
        # preprocess names the missing text_input for every shape of the mistake (docs/API.md)
        ({"image_bytes": [base64.b64encode(synthetic_image(1, 64, 64, "PNG")).decode()], "max_tokens": 4}, 400, "input 'text_input' is required"),
        ({"prompt": "Hi"}, 400, "input 'text_input' is required"),
        ({"prompt": "Hi", "max_tokens": 4}, 400, "input 'text_input' is required"),
        ({}, 400, "input 'text_input' is required"),
        # Triton's HTTP front parses the body before any model runs and answers its JSON errors with 500
        # (server src/http_server.cc: TRITONJSON_STATUSRETURN makes them TRITONSERVER_ERROR_INTERNAL)
        ({"text_input": "Hi", "max_tokens": "4"}, 500, "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"),
    ],
)
def test_http_generate_with_a_missing_or_mistyped_field(server, body, status, message):
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/internvl/generate", json.dumps(body).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == status and message in json.loads(caught.value.read())["error"]
    assert server.ready()
