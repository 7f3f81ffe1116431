"""Request size limits of the OpenAI server (issue 29, item 1). The body limit is enforced while the
body is read (a declared size over it: 413 before reading; a chunked body: cut at it), so one huge
request cannot grow the server; image count, pixels and bytes are refused (400) with the build's own
limits, read from Triton's `preprocess` config, before anything is decoded or forwarded."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from client.synthetic import synthetic_image
from launcher.server import free_port
from openai_api.limits import RequestLimits
from openai_api.server import running_server
from openai_api.settings import Settings
from openai_api.triton import Reply
from tests import config_triton
from tests.config_triton import PARAMETERS
from tests.test_openai_api import FakeBackend
from tests.test_serving_contract import png_header

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
# what `make build` writes into preprocess/config.pbtxt (triton_repo/preprocess/config.pbtxt.tmpl)
BODY_LIMIT = math.ceil(8 * MIB * 4 / 3) + MIB  # the documented default of --max-request-bytes


class LimitedBackend(FakeBackend):
    async def preprocess_parameters(self):
        return PARAMETERS


@pytest.fixture(scope="module")
def api():
    backend = LimitedBackend()
    with running_server(Settings(host="127.0.0.1", port=0, served_model_name="tiny"), backend) as url:
        backend.url = url
        yield backend


@pytest.fixture(scope="module")
def subprocess_api():
    """python -m openai_api in its own process (so its peak RSS is its own), next to a config-only Triton."""
    triton, grpc_port = config_triton.start()
    port = free_port()
    command = [sys.executable, "-m", "openai_api", "--triton-url", f"127.0.0.1:{grpc_port}", "--port", str(port), "--served-model-name", "tiny", "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None, "the OpenAI server exited"
                time.sleep(0.1)
        yield process, url
    finally:
        process.terminate()
        process.wait(10)
        triton.stop(0)


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set size, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _huge_body(total: int, image_bytes: int, model: str = "tiny"):
    """A chat request of `total` bytes whose one image is a data URI of `image_bytes` base64 bytes,
    generated in 1 MiB pieces."""
    head = b'{"model": "' + model.encode() + b'", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,'
    middle = b'"}}, {"type": "text", "text": "'
    tail = b'"}]}]}'
    yield head
    for data, size in ((b"A" * MIB, image_bytes), (b"a" * MIB, total - len(head) - image_bytes - len(middle) - len(tail))):
        for start in range(0, size, MIB):
            yield data[: min(MIB, size - start)]
        yield middle if data[:1] == b"A" else tail


def _post(url: str, body, length: int | None, key: str | None = None, timeout: float = 120) -> tuple[int, dict]:
    """POST /v1/chat/completions; length None: chunked transfer encoding."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Content-Length": str(length)} if length is not None else {})}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request("POST", "/v1/chat/completions", body, headers, encode_chunked=length is None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _json(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    return _post(url, data, len(data))


def _with_text(size: int, chunked: bool = False):
    """A valid request of exactly `size` bytes (its text pads it)."""
    empty = json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": ""}]}).encode()
    body = empty.replace(b'"content": ""', b'"content": "' + b"a" * (size - len(empty)) + b'"')
    assert len(body) == size
    return (iter([body[i : i + MIB] for i in range(0, size, MIB)]), None) if chunked else (body, size)


def test_the_default_body_limit_is_four_thirds_of_the_builds_image_bytes_plus_a_mib():
    limits = RequestLimits.from_parameters(PARAMETERS)
    assert (limits.max_images, limits.max_image_pixels, limits.max_image_bytes) == (2, 1_000_000, 8 * MIB)
    assert limits.body_bytes == BODY_LIMIT


def test_a_200_mib_body_is_refused_while_read_and_the_server_barely_grows(subprocess_api):
    process, url = subprocess_api
    assert _json(url, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": -1})[0] == 400  # warm
    before = peak_rss(process.pid)
    total, image = 200 * MIB, 150 * MIB
    for length in (total, None):  # declared, then chunked
        status, body = _post(url, _huge_body(total, image), length)
        assert status == 413, body
        assert body["error"]["type"] == "RequestTooLargeError" and body["error"]["code"] == 413
        assert str(BODY_LIMIT) in body["error"]["message"] and "--max-request-bytes" in body["error"]["message"]
    grown = peak_rss(process.pid) - before
    print(f"VmHWM rise after two 200 MiB requests: {grown / MIB:.1f} MiB")
    assert grown < 64 * MIB
    assert urllib.request.urlopen(url + "/v1/models", timeout=5).status == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_the_limit_is_served_and_one_byte_more_is_413(api, chunked):
    api.script = [Reply("ok", "", 1, 1, "stop")]
    status, body = _post(api.url, *_with_text(BODY_LIMIT, chunked))
    assert status == 200 and body["choices"][0]["message"]["content"] == "ok", body
    api.requests.clear()
    status, body = _post(api.url, *_with_text(BODY_LIMIT + 1, chunked))
    assert status == 413 and api.requests == []


def _parts(*urls: str) -> list[dict]:
    return [{"type": "text", "text": "Describe."}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]


def _uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _ask(api, *urls: str) -> tuple[int, dict]:
    api.requests.clear()
    return _json(api.url, {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": _parts(*urls)}]})


def test_more_image_parts_than_the_build_allows_are_refused_before_any_is_decoded(api):
    status, body = _ask(api, _uri(synthetic_image(1, 64, 64, "PNG")), *["data:image/png;base64,@@@"] * 4999)
    assert (status, body["error"]["param"]) == (400, "messages"), body
    assert "the request has 5000 images; this deployment allows 2" in body["error"]["message"]  # not a base64 error
    assert api.requests == []


@pytest.mark.parametrize(
    "image, says",
    [(synthetic_image(2, 1001, 1000, "PNG"), "1001×1000 is 1001000 pixels; this deployment allows 1000000"),
     (png_header(50_000, 50_000), "2500000000 pixels"), (png_header(1000, 1001), "1000×1001 is 1001000 pixels")],
    ids=["over-the-limit", "beyond-pil", "header-only"],
)  # fmt: skip
def test_an_image_with_more_pixels_than_the_build_allows_is_refused_naming_its_part(api, image, says):
    status, body = _ask(api, _uri(synthetic_image(3, 64, 64, "PNG")), _uri(image))
    assert (status, body["error"]["param"]) == (400, "messages[0].content[2].image_url"), body
    assert says in body["error"]["message"] and body["error"]["message"].startswith("messages[0].content[2].image_url")
    assert api.requests == []


def test_images_over_the_builds_bytes_per_request_are_refused(api):
    half = b"\x89PNG" + b"\0" * (4 * MIB + 100)  # not decodable: only its size matters here
    status, body = _ask(api, _uri(half), _uri(half))
    assert (status, body["error"]["param"]) == (400, "messages"), body
    assert f"the request's images up to messages[0].content[2].image_url hold {2 * len(half)} bytes; this deployment allows {8 * MIB} per request" in body["error"]["message"]
    assert api.requests == []


def test_images_within_the_limits_are_forwarded(api):
    api.script = [Reply("ok", "", 1, 1, "stop")]
    image = synthetic_image(4, 1000, 1000, "PNG")
    status, body = _ask(api, _uri(image), _uri(image))
    assert status == 200 and api.requests[-1]["image_bytes"] == ("BYTES", [image, image]), body


def _headers_only(url: str, length: int) -> tuple[int, dict]:
    """Sends the headers of a POST with a body of `length` bytes and never the body."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=5)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    response = connection.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_declared_size_over_the_limit_is_413_before_the_body_is_read(api):
    status, body = _headers_only(api.url, 200 * MIB)
    assert status == 413 and f"{200 * MIB} bytes" in body["error"]["message"], body


def test_until_triton_answers_a_body_is_503_unless_the_flag_sets_the_limit():
    down = Settings(host="127.0.0.1", port=0, triton_url="127.0.0.1:1")
    with running_server(down) as url:
        status, body = _headers_only(url, 200 * MIB)
        assert status == 503 and "--max-request-bytes" in body["error"]["message"], body
    with running_server(dataclasses.replace(down, max_request_bytes=1000)) as url:
        assert _headers_only(url, 1001)[0] == 413
