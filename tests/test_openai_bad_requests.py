"""Bad requests to the OpenAI server in front of a live tritonserver each get their documented status
and a message naming the problem, while good requests sent at the same time all succeed (issue 13;
docs/API.md, Errors)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from client.synthetic import synthetic_image
from engine.pipeline import Pipeline
from openai_api.server import running_server
from openai_api.settings import Settings

MODEL = "tiny"
IMAGE = synthetic_image(31, 400, 300, "PNG")


def _uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _body(**fields) -> dict:
    return {"model": MODEL, "messages": _user("Hi"), "max_tokens": 8, **fields}


# name: (raw body, status, text the error message contains)
BAD = {
    "temperature-negative": (_body(temperature=-1), 400, "temperature must be ≥ 0"),
    "temperature-not-a-number": (_body(temperature="hot"), 422, "temperature"),
    "top-p-0": (_body(top_p=0), 400, "top_p must be in (0, 1]"),
    "top-p-above-1": (_body(top_p=1.5), 400, "top_p must be in (0, 1]"),
    "top-k-negative": (_body(top_k=-1), 400, "top_k must be ≥ 0"),
    "repetition-penalty-0": (_body(repetition_penalty=0), 400, "repetition_penalty must be in"),
    "max-tokens-0": (_body(max_tokens=0), 400, "max_tokens must be ≥ 1"),
    "max-completion-tokens-0": (_body(max_completion_tokens=0), 400, "max_tokens must be ≥ 1"),
    "max-tokens-beyond-context": (_body(max_tokens=10_000_000), 400, "must fit this deployment's context"),
    "seed-negative": (_body(seed=-1), 400, "seed"),
    "n-2": (_body(n=2), 400, "n must be 1"),
    "unknown-model": (_body(model="gpt-4o"), 404, "The model `gpt-4o` does not exist"),
    "no-messages": (_body(messages=[]), 422, "messages"),
    "messages-not-a-list": (_body(messages="Hi"), 422, "messages"),
    "ends-with-assistant": (_body(messages=[*_user("Hi"), {"role": "assistant", "content": "Hello"}]), 400, "user"),
    "bad-base64": (_body(messages=_user("Hi", "data:image/png;base64,@@@")), 400, "messages[0].content[0]"),
    "remote-image": (_body(messages=_user("Hi", "https://example.com/cat.png")), 400, "example.com"),
    "corrupt-image": (_body(messages=_user("Hi", _uri(b"\x89PNG\r\n\x1a\n" + b"\0" * 64))), 400, "cannot decode image"),
    "too-many-images": (_body(messages=_user("Hi", *[_uri(IMAGE)] * 3)), 400, "the request has 3 images; this deployment allows 2"),
    "more-tags-than-images": (_body(messages=_user("<image>\n<image>\nCompare.", _uri(IMAGE))), 400, "<image>"),
    "prompt-too-long": (_body(messages=_user(" ".join(["word"] * 6000))), 400, "the prompt has"),
}
RAW = {  # bodies that are not the JSON of a request
    "not-json": (b"{not json", 422, '"message": "the request body is not valid JSON: Expecting property name enclosed in double quotes (at byte 1)", "type": "UnprocessableEntityError", "param": null'),
    "nan-temperature": (b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', None, ""),
}


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def openai_url(server):
    with running_server(Settings(triton_url=server.grpc_url, port=0, served_model_name=MODEL)) as url:
        yield url


def test_bad_requests_get_their_status_while_concurrent_good_ones_succeed(openai_url, server, tiny):
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipe:
        expected = pipe.chat("Describe the image.", [IMAGE], max_new_tokens=20)
    good = json.dumps({"model": MODEL, "messages": _user("Describe the image.", _uri(IMAGE)), "max_tokens": 20}).encode()
    cases = {name: (json.dumps(body).encode(), status, text) for name, (body, status, text) in BAD.items()} | RAW
    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(_post, openai_url, good) for _ in range(4)]
        answers = {name: pool.submit(_post, openai_url, body) for name, (body, _, _) in cases.items()}
        answers = {name: f.result() for name, f in answers.items()}
        assert [g.result()[1]["choices"][0]["message"]["content"] for g in goods] == [expected] * 4
    assert len(answers) >= 20
    for name, (status, reply) in answers.items():
        expected_status, text = cases[name][1], cases[name][2]
        if expected_status is None:  # NaN is not JSON: refused either as a schema or as a value error
            assert status in (400, 422), (name, status, reply)
        else:
            assert status == expected_status, (name, status, reply)
        assert "error" in reply, (name, status, reply)
        error = reply["error"]
        assert text in json.dumps(error, ensure_ascii=False), (name, error)
        assert error["code"] == status and error["message"]
    assert server.ready()
    assert _post(openai_url, good)[1]["choices"][0]["message"]["content"] == expected
