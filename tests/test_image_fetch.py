"""Fetching image URLs from allow-listed hosts (issue 29, item 4): one async request with a total
deadline and a byte limit. At the deadline the connection is closed and nothing is left running (a
thread reading on would hold the download, and six of them blocked every later fetch); redirects are
refused, a declared or streamed size over the limit is refused as soon as it is known."""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from openai_api.server import running_server
from openai_api.settings import Settings
from tests.test_openai_api import FakeBackend

DEADLINE = 1.0
LIMIT = 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    """/slow: 1 byte every 0.25 s of a declared 100; /limit+1: LIMIT + 1 bytes, then the connection
    held open; /declared: Content-Length over the limit, no body yet; /redirect: 302 to /target."""

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/target")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path == "/slow":
            self.send_header("Content-Length", "100")
        if self.path == "/declared":
            self.send_header("Content-Length", str(LIMIT * 5))
        self.end_headers()
        try:
            if self.path == "/slow":
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            elif self.path == "/limit+1":
                self.wfile.write(b"x" * (LIMIT + 1))
                self.wfile.flush()
                time.sleep(5)
            else:
                time.sleep(5)
        except OSError:  # the client closed the connection
            self.server.closed_at.append(time.monotonic())

    def log_message(self, *args):
        pass


@pytest.fixture
def remote():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.paths, httpd.closed_at = [], []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api(remote):
    settings = Settings(host="127.0.0.1", port=0, served_model_name="tiny", allow_image_hosts=("127.0.0.1",),
                        max_image_bytes=LIMIT, image_fetch_timeout=DEADLINE)  # fmt: skip
    with running_server(settings, FakeBackend()) as url:
        yield url


def _ask(api: str, image_url: str) -> tuple[int, dict]:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "Describe."}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    request = urllib.request.Request(api + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _connections_to(port: int) -> list:
    return [c for c in psutil.Process().net_connections("tcp") if c.status != psutil.CONN_LISTEN and port in (c.laddr.port, c.raddr and c.raddr.port)]


def test_a_slow_download_ends_at_the_deadline_leaving_no_thread_or_socket(api, remote):
    threads = set(threading.enumerate())
    started = time.monotonic()
    status, body = _ask(api, remote.base + "/slow")
    refused = time.monotonic() - started
    assert status == 400 and f"longer than {DEADLINE:g} s" in body["error"]["message"], body
    assert DEADLINE <= refused < DEADLINE + 0.5
    while time.monotonic() < started + DEADLINE + 1 and (set(threading.enumerate()) - threads or _connections_to(remote.server_address[1])):
        time.sleep(0.05)
    assert remote.closed_at and remote.closed_at[0] - started <= DEADLINE + 1, "the slow server did not see its connection closed"
    assert set(threading.enumerate()) - threads == set()
    assert _connections_to(remote.server_address[1]) == []


def test_slow_downloads_do_not_hold_up_later_fetches(api, remote):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _ask(api, remote.base + "/slow"), range(8)))
    assert [status for status, _ in answers] == [400] * 8
    started = time.monotonic()
    status, body = _ask(api, remote.base + "/declared")  # refused from its header: answers at once
    assert status == 400 and time.monotonic() - started < DEADLINE / 2, body


def test_a_redirect_is_refused_not_followed(api, remote):
    status, body = _ask(api, remote.base + "/redirect")
    assert status == 400 and "redirect to" in body["error"]["message"] and "refused" in body["error"]["message"]
    assert remote.paths == ["/redirect"]


def test_a_declared_length_over_the_limit_is_refused_before_reading(api, remote):
    started = time.monotonic()
    status, body = _ask(api, remote.base + "/declared")
    assert status == 400 and f"{LIMIT * 5} bytes, the limit is {LIMIT}" in body["error"]["message"], body
    assert time.monotonic() - started < DEADLINE / 2


def test_a_streamed_body_is_cut_at_the_limit_plus_one_byte(api, remote):
    started = time.monotonic()
    status, body = _ask(api, remote.base + "/limit+1")  # the server then holds the connection open
    assert status == 400 and f"larger than the limit of {LIMIT} bytes" in body["error"]["message"], body
    assert time.monotonic() - started < DEADLINE / 2
