"""The OpenAI-compatible server (openai_api/): conversation building, images, request checks, JSON
and SSE responses, cancellation on disconnect, against a fake Triton (an injected backend, or a fake
gRPC server for the real gRPC client); and live against a real tritonserver."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import openai
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from openai_api.conversation import build_conversation
from openai_api.errors import APIError
from openai_api.images import ImageLoader
from openai_api.schema import ChatCompletionRequest
from openai_api.server import running_server
from openai_api.settings import Settings
from openai_api.triton import Reply, TritonBackend

PNG, PNG_B = b"\x89PNG\r\n\x1a\nfake-a", b"\x89PNG\r\n\x1a\nfake-b"
SETTINGS = Settings(host="127.0.0.1", port=0, served_model_name="tiny")


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _image(url: str, detail: str | None = None) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def _conversation(messages: list[dict]):
    return build_conversation(ChatCompletionRequest(model="m", messages=messages).messages)


def _api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as error:
        fn(*args)
    return error.value


def test_images_go_before_the_text_vllm_style_and_history_keeps_its_images():
    conv = _conversation([
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare."}, _image("A"), _image("B")]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "And <image> this?"}, _image("C", "low")]},
    ])  # fmt: skip
    assert (conv.system_prompt, conv.question) == ("Be brief.", "And <image> this?")
    assert conv.history == [("<image>\n<image>\nCompare.", "They differ.")]
    assert [(i.url.url, i.param) for i in conv.images] == [("A", "messages[1].content[1]"), ("B", "messages[1].content[2]"), ("C", "messages[3].content[1]")]
    assert conv.max_tiles == 1  # one "low" image: the smallest budget wins
    assert _conversation([{"role": "user", "content": [_image("A", "high")]}]).max_tiles is None
    assert vars(_conversation([{"role": "user", "content": "Hi"}])) == {"question": "Hi", "history": [], "system_prompt": None, "images": [], "video": None}


def _turns(*roles: str) -> list[dict]:
    return [{"role": role, "content": "x"} for role in roles]


@pytest.mark.parametrize(
    "messages, param",
    [([{"role": "user", "content": [{"type": "text", "text": "<image><image>"}, _image("A")]}], "messages[0].content"),  # tag count
     (_turns("assistant", "user"), "messages"), (_turns("user", "user"), "messages"), (_turns("user", "assistant"), "messages"),
     (_turns("user", "system", "user"), "messages"), (_turns("system", "system", "user"), "messages"),
     ([{"role": "system", "content": [_image("A")]}, *_turns("user")], "messages[0].content[0]")],
)  # fmt: skip
def test_malformed_conversations_are_400_naming_where(messages, param):
    error = _api_error(_conversation, messages)
    assert (error.status, error.param) == (400, param)


def _load(url: str, settings: Settings = SETTINGS) -> bytes:
    conv = _conversation([{"role": "user", "content": [{"type": "text", "text": "q"}, _image(url)]}])
    return asyncio.run(ImageLoader(settings).load_one(conv.images[0]))


@pytest.mark.parametrize(
    "url, message",
    [("data:image/png;base64,@@@not-base64", "invalid base64"), ("data:image/png,rawtext", "data URI"), ("not base64 at all!", "invalid base64"),
     ("https://example.com/a.png", "--allow-image-host"), ("file:///etc/passwd", "unsupported URL scheme")],
)  # fmt: skip
def test_bad_or_remote_images_are_400_naming_message_and_part(url, message):
    error = _api_error(_load, url)
    assert error.status == 400 and message in error.message
    assert error.param == "messages[0].content[1].image_url" and error.param in error.message


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(1.5 if self.path == "/slow.png" else 0)
        body = {"/a.png": PNG, "/slow.png": PNG, "/big.png": b"x" * 5000}.get(self.path, b"")
        self.send_response(302 if self.path == "/redirect.png" else 200 if body else 404)
        self.send_header("Location", "http://127.0.0.2/a.png")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client stops reading at its size limit
            self.wfile.write(body)


def test_allow_listed_host_is_fetched_within_size_and_time_limits():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{httpd.server_address[1]}"
    allowed = Settings(allow_image_hosts=("127.0.0.1",), max_image_bytes=1000, image_fetch_timeout=0.5)
    try:
        assert _load(f"{host}/a.png", allowed) == PNG
        for path, message in [("big", "limit of 1000 bytes"), ("slow", "longer than 0.5 s"), ("none", "HTTP 404"), ("redirect", "redirect")]:
            error = _api_error(_load, f"{host}/{path}.png", allowed)
            assert error.status == 400 and message in error.message, error.message
        assert "not allowed" in _api_error(_load, f"{host}/a.png").message
    finally:
        httpd.shutdown()


# the limits a default build writes into Triton's preprocess config (build/settings.py BuildSettings)
LIMITS = {"max_images": "4", "max_image_pixels": "40000000", "max_request_bytes": str(64 * 2**20)}


class FakeBackend(TritonBackend):
    """Plays a script of Replies / exceptions as the ensemble's responses; records every request."""

    def __init__(self):
        super().__init__("127.0.0.1:1")
        self.script, self.requests = [], []

    async def preprocess_parameters(self):
        return {"checkpoint": "/models/tiny", **LIMITS}

    async def stream(self, fields, request_id):
        self.requests.append(fields)
        for item in self.script:
            if isinstance(item, Exception):
                raise item
            yield item


def _replies(*deltas: tuple[str, str], finish="stop") -> list[Reply]:
    return [Reply(c, r, 7, i + 1, finish if i == len(deltas) - 1 else "") for i, (c, r) in enumerate(deltas)]


@pytest.fixture(scope="module")
def fake():
    backend = FakeBackend()
    with running_server(SETTINGS, backend) as url:
        backend.url = url
        yield backend


def _post(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _body(**kwargs) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **kwargs}


@pytest.mark.parametrize(
    "fields, param",
    [({"temperature": -1}, "temperature"), ({"temperature": 1e309}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"max_tokens": 0}, "max_tokens"),
     ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"), ({"seed": -1}, "seed"), ({"n": 2}, "n"), ({"top_k": 2**31}, "top_k"),
     ({"temperature": float("nan")}, "temperature"), ({"top_p": float("nan")}, "top_p"), ({"repetition_penalty": float("nan")}, "repetition_penalty")],
)  # fmt: skip
def test_out_of_range_values_are_400_naming_the_field(fake, fields, param):
    fake.requests.clear()
    status, body = _post(fake.url, _body(**fields))  # NaN: Python's json writes and reads it
    error = json.loads(body)["error"]
    assert (status, error["param"], error["type"], error["code"]) == (400, param, "BadRequestError", 400)
    assert param.split("_completion")[0] in error["message"] and fake.requests == []


@pytest.mark.parametrize("fields, field", [({"max_tokens": "many"}, "max_tokens"), ({"messages": "Hi"}, "messages"), ({"stream": {}}, "stream")])
def test_wrong_json_types_are_422(fake, fields, field):
    status, body = _post(fake.url, _body(**fields))
    error = json.loads(body)["error"]
    assert status == error["code"] == 422 and error["param"].startswith(field) and field in error["message"]


def test_non_streaming_reply_and_the_fields_sent_to_triton(fake):
    fake.script = _replies(("", "Let me think."), ("Hello", ""), (" there", ""), finish="length")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, _image(_data_uri(PNG))]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [_image(base64.encodebytes(PNG_B).decode(), "low"), {"type": "text", "text": "And this?"}]},
    ]
    extra = dict(max_tokens=3, max_completion_tokens=9, temperature=0.5, top_p=0.9, top_k=4, repetition_penalty=1.1,
                 seed=3, stop=["END", "x"], chat_template_kwargs={"enable_thinking": True}, unknown_field=1)  # fmt: skip
    status, body = _post(fake.url, _body(messages=messages, **extra))
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    message = {"role": "assistant", "content": "Hello there", "reasoning_content": "Let me think."}
    assert reply["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length", "message": message}]
    assert reply["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert {k: v for k, (_, v) in fake.requests[-1].items()} == {
        "text_input": ["<image>\nAnd this?"], "stream": [False], "image_bytes": [PNG, PNG_B], "max_tokens": [9],
        "temperature": [0.5], "top_p": [0.9], "top_k": [4], "repetition_penalty": [1.1], "random_seed": [3],
        "stop_words": ["END", "x"], "max_tiles": [1], "history": [json.dumps([["<image>\nDescribe.", "A picture."]])],
        "system_prompt": ["Be brief."], "enable_thinking": [True],
    }  # fmt: skip
    fake.script = _replies(("Hi", ""))
    assert json.loads(_post(fake.url, _body(stop="END"))[1])["choices"][0]["message"]["reasoning_content"] is None
    assert set(fake.requests[-1]) == {"text_input", "stream", "stop_words"}  # absent fields are not sent


def _events(body: bytes) -> list:
    frames = body.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""] and all(f.startswith("data: ") for f in frames[:-1])
    return [json.loads(f[6:]) for f in frames[:-2]]


def test_streaming_sse_framing_deltas_and_usage(fake):
    fake.script = _replies(("", "Hmm"), ("", ""), ("A", ""), ("B", ""))
    status, body = _post(fake.url, _body(stream=True, stream_options={"include_usage": True}))
    chunks = _events(body)
    assert status == 200 and all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    deltas = [{"role": "assistant", "content": ""}, {"reasoning_content": "Hmm"}, {"content": "A"}, {"content": "B"}, {}]
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == deltas  # the empty delta is skipped
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
    assert fake.requests[-1]["stream"] == ("BOOL", [True])
    assert "usage" not in json.dumps(_events(_post(fake.url, _body(stream=True))[1]))


def test_errors_before_streaming_are_http_statuses_and_after_are_error_events(fake):
    fake.script = [APIError(400, "max_tiles must be in [1, 12], got 0")]
    status, body = _post(fake.url, _body(stream=True))
    assert status == 400 and json.loads(body)["error"]["message"] == "max_tiles must be in [1, 12], got 0"
    fake.script = [Reply("A", "", 7, 1, ""), APIError(500, "engine failed")]
    status, body = _post(fake.url, _body(stream=True))
    error = {"message": "engine failed", "type": "InternalServerError", "param": None, "code": 500}
    assert status == 200 and _events(body)[-1] == {"error": error}


def test_every_route_with_triton_down_is_503_naming_its_address(caplog):
    """The newcomer's case: Triton not started (or at another port). The start warns once; /v1/models
    does not invent a name, and a request naming the real model gets 503, not 404."""
    with caplog.at_level("WARNING", logger="openai_api"):
        with running_server(Settings(host="127.0.0.1", port=0, triton_url="127.0.0.1:1")) as url:
            with pytest.raises(urllib.error.HTTPError, match="503"):
                urllib.request.urlopen(url + "/health")
            for body in (None, _body(model="tiny-qwen3"), _body(model="internvl")):  # /v1/models, then two requests
                status, reply = _post(url, body) if body else _get(url + "/v1/models")
                error = json.loads(reply)["error"]
                assert status == 503 and error["type"] == "ServiceUnavailableError", body
                assert error["message"].startswith("Triton is not reachable at 127.0.0.1:1"), error
    warnings = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1:1" in warnings[0]


class _FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self):
        self.requests, self.cancelled, self.tokens = [], threading.Event(), 3
        self.ends: list[str] = []  # after the final response: "closed" by the client or "cancelled"

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == "internvl")

    def ModelConfig(self, request, context):
        parameters = {"checkpoint": "/models/InternVL3-1B/", **LIMITS}
        return service_pb2.ModelConfigResponse(config={"parameters": {k: {"string_value": v} for k, v in parameters.items()}})

    def ModelStreamInfer(self, request_iterator, context):
        request, sent = next(request_iterator), []
        self.requests.append(request)
        context.add_callback(lambda: len(sent) < self.tokens and self.cancelled.set())
        if b"bad" in request.raw_input_contents[0]:
            yield service_pb2.ModelStreamInferResponse(error_message="in ensemble 'internvl', ImageError: cannot decode image 0")
            return
        for i in range(self.tokens):
            response = service_pb2.ModelInferResponse(model_name="internvl", id=request.id)
            outputs = [("text_output", "ab"), ("content_output", "ab"), ("reasoning_output", ""), ("finish_reason", "stop" if i == self.tokens - 1 else ""),
                       ("prompt_tokens", 5), ("completion_tokens", i + 1)]  # fmt: skip
            for name, value in outputs:
                array = np.array([[value]], dtype=object if isinstance(value, str) else np.int32)
                response.outputs.add(name=name, datatype="BYTES" if isinstance(value, str) else "INT32", shape=[1, 1])
                response.raw_output_contents.append(serialize_byte_tensor(array).item() if isinstance(value, str) else array.tobytes())
            time.sleep(0.02)
            yield service_pb2.ModelStreamInferResponse(infer_response=response)
            sent.append(i)
        final = service_pb2.ModelInferResponse(model_name="internvl", id=request.id)
        final.parameters["triton_final_response"].bool_param = True
        yield service_pb2.ModelStreamInferResponse(infer_response=final)
        # Like tritonserver, the stream ends when the client closes its side (or cancels).
        with contextlib.suppress(grpc.RpcError):
            for _ in request_iterator:
                pass
        self.ends.append("closed" if context.is_active() else "cancelled")


@pytest.fixture
def fake_triton():
    triton, server = _FakeTriton(), grpc.server(futures.ThreadPoolExecutor(4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with running_server(Settings(host="127.0.0.1", port=0, triton_url=f"127.0.0.1:{port}")) as url:
        triton.url, triton.port, triton.sdk = url, port, openai.OpenAI(base_url=url + "/v1", api_key="none")
        yield triton
    server.stop(0)


def test_grpc_client_streams_reads_the_checkpoint_name_and_classifies_errors(fake_triton):
    client, messages = fake_triton.sdk, [{"role": "user", "content": "Hi"}]
    assert [(m.id, m.owned_by) for m in client.models.list()] == [("InternVL3-1B", "internvl-serve")]
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist."):
        client.chat.completions.create(model="gpt-4", messages=messages)
    assert urllib.request.urlopen(fake_triton.url + "/health").status == 200
    reply = client.chat.completions.create(model="InternVL3-1B", messages=messages, max_tokens=4)
    assert (reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.completion_tokens) == ("ababab", 5, 3)
    request = fake_triton.requests[-1]
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    inputs = [("text_input", "BYTES", [1, 1]), ("stream", "BOOL", [1, 1]), ("max_tokens", "INT32", [1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == inputs
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(model="InternVL3-1B", messages=messages, stream=True)]
    assert "".join(deltas) == "ababab"
    with pytest.raises(openai.BadRequestError, match="cannot decode image 0"):
        client.chat.completions.create(model="InternVL3-1B", messages=[{"role": "user", "content": "bad"}])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "once"])
@pytest.mark.parametrize("via", ["openai", "triton client"])
def test_a_finished_call_is_closed_not_cancelled(fake_triton, via, stream):
    # tritonserver 2.51 keeps ~100 KiB per ensemble stream cancelled after its final response (docs/API.md).
    messages = [{"role": "user", "content": "Hi"}]
    if via == "openai":
        reply = fake_triton.sdk.chat.completions.create(model="InternVL3-1B", messages=messages, max_tokens=4, stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in reply) if stream else reply.choices[0].message.content
    else:
        client = InternVLClient(f"127.0.0.1:{fake_triton.port}")
        text = client.chat("Hi", max_tokens=4, stream=stream)
    assert text == "ababab"
    deadline = time.monotonic() + 3
    while not fake_triton.ends and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_triton.ends == ["closed"] and not fake_triton.cancelled.is_set()


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_disconnect_cancels_the_grpc_call(fake_triton, stream):
    fake_triton.tokens = 500
    connection = http.client.HTTPConnection(fake_triton.url.removeprefix("http://"), timeout=10)
    connection.request("POST", "/v1/chat/completions", json.dumps(_body(model="InternVL3-1B", stream=stream)), {"Content-Type": "application/json"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    else:
        time.sleep(0.3)
    connection.sock.shutdown(2)
    connection.close()
    assert fake_triton.cancelled.wait(3), "the gRPC call was not cancelled after the client went away"


MAX_NEW = 12


@pytest.fixture(scope="module")
def pipe(tiny):
    pipeline = Pipeline.from_pretrained(tiny, vision_backend="onnxruntime")
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def api(server):
    with running_server(Settings(host="127.0.0.1", port=0, triton_url=server.grpc_url)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        client.served, client.images = client.models.list().data[0].id, [synthetic_image(s, w, h, "PNG") for s, w, h in [(1, 640, 400), (2, 300, 800), (3, 500, 500)]]
        yield client


def _ask(api, question: str, images=(), history=(), stream=False):
    """(reply, usage, finish_reason) through the OpenAI API; history: (user, its images, assistant) turns."""
    turns = [(u, imgs, {"role": "assistant", "content": a}) for u, imgs, a in history] + [(question, images, None)]
    messages = [m for u, imgs, a in turns for m in ({"role": "user", "content": [{"type": "text", "text": u}, *map(_image, map(_data_uri, imgs))]}, a) if m]
    kwargs = dict(model=api.served, messages=messages, max_tokens=MAX_NEW)
    if not stream:
        reply = api.chat.completions.create(**kwargs)
        return reply.choices[0].message.content, reply.usage, reply.choices[0].finish_reason
    chunks = list(api.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage, finish


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    "question, ids", [("Hello, who are you?", ()), ("Describe the image in detail.", (0,)), ("Image-1: <image>\nImage-2: <image>\nWhat differs?", (1, 2))]
)
def test_live_reply_and_usage_equal_the_pipeline(api, pipe, question, ids, stream):
    images = [api.images[i] for i in ids]
    expected = pipe.generate(question, images, max_new_tokens=MAX_NEW)
    text, usage, finish = _ask(api, question, images, stream=stream)
    assert (text, finish) == (expected.text, expected.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, len(expected.token_ids))


def test_live_second_turn_with_an_image_in_history_equals_the_pipeline(api, pipe):
    images = api.images[:1]
    first, history = pipe.chat("Describe the image.", images, max_new_tokens=MAX_NEW, return_history=True)
    expected = pipe.chat("What colour dominates?", images, history, max_new_tokens=MAX_NEW)
    assert _ask(api, "Describe the image.", images)[0] == first
    assert _ask(api, "What colour dominates?", (), [("Describe the image.", images, first)])[0] == expected


def test_live_replies_depend_on_the_image_and_the_prompt(api):
    one, two = api.images[:2]
    assert _ask(api, "Describe the image.", [one])[0] != _ask(api, "Describe the image.", [two])[0]
    assert _ask(api, "Describe the image.", [one])[0] != _ask(api, "Count the objects in the image.", [one])[0]
