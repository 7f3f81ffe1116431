"""Issue 29's hostile requests against the OpenAI server in its own process (as `make serve` starts
it, the API key from INTERNVL_API_KEY) in front of a real tritonserver: a 200 MiB body, 5,000 image
parts, an infinite float32 temperature and a wrong API key each get their error, while 8 good
requests sent at the same time all complete and the server's peak memory barely moves."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from client.synthetic import synthetic_image
from launcher.openai_process import OpenAIProcess
from launcher.server import free_port
from tests.test_openai_limits import MIB, _huge_body, _post, peak_rss

KEY = "issue-29-key"
IMAGE = "data:image/png;base64," + base64.b64encode(synthetic_image(5, 320, 240, "PNG")).decode()
DOT = "data:image/png;base64," + base64.b64encode(synthetic_image(6, 1, 1, "PNG")).decode()


@pytest.fixture(scope="module")
def openai_process(server):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("INTERNVL_API_KEY", KEY)  # the child inherits it, as from make serve
        process = OpenAIProcess(server.grpc_url, "127.0.0.1", free_port()).start()
    try:
        yield process
    finally:
        process.stop()


def _chat(url: str, key: str, messages: list[dict], **fields) -> tuple[int, dict]:
    body = json.dumps({"model": "tiny-qwen3", "messages": messages, "max_tokens": 8, **fields}).encode()
    return _post(url, body, len(body), key)


def _user(text: str, *images: str) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in images), {"type": "text", "text": text}]}]


def test_hostile_requests_get_their_errors_while_good_ones_complete(openai_process, server):
    url = openai_process.url
    good = _user("Describe the image.", IMAGE)
    assert _chat(url, KEY, good)[0] == 200  # warm: the first request's allocations are not the attack's
    before = peak_rss(openai_process.process.pid)
    hostile = {
        "200 MiB body": (lambda: _post(url, _huge_body(200 * MIB, 150 * MIB, "tiny-qwen3"), 200 * MIB, KEY), 413, None),
        "5000 image parts": (lambda: _chat(url, KEY, _user("Describe.", *[DOT] * 5000)), 400, "messages"),
        "temperature 1e39": (lambda: _chat(url, KEY, good, temperature=1e39), 400, "temperature"),
        "wrong API key": (lambda: _chat(url, "not-the-key", good), 401, None),
    }
    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(_chat, url, KEY, good, seed=i, temperature=0.7) for i in range(8)]
        bad = {name: pool.submit(send) for name, (send, _, _) in hostile.items()}
        goods, bad = [g.result() for g in goods], {name: f.result() for name, f in bad.items()}
    for status, reply in goods:
        assert status == 200, reply
        assert reply["choices"][0]["finish_reason"] in ("stop", "length") and 0 < reply["usage"]["completion_tokens"] <= 8
    for name, (_, status, param) in hostile.items():
        got, reply = bad[name]
        assert (got, reply["error"]["code"], reply["error"]["param"]) == (status, status, param), (name, reply)
    grown = peak_rss(openai_process.process.pid) - before
    print(f"VmHWM rise of the OpenAI server: {grown / MIB:.1f} MiB")
    assert grown < 64 * MIB
    assert server.ready() and _chat(url, KEY, good)[0] == 200
