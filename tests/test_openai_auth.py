"""API keys (issue 29, item 3): with --api-key (repeatable) or INTERNVL_API_KEY set, every /v1/* route
asks for `Authorization: Bearer <key>` and answers 401 in OpenAI's error shape before it reads a
body; /health stays open; every configured key is compared in constant time."""

from __future__ import annotations

import hmac
import http.client
import json
import urllib.error
import urllib.request

import openai
import pytest

import openai_api.__main__ as cli
from openai_api.server import running_server
from openai_api.settings import Settings
from openai_api.triton import Reply
from tests.test_openai_api import FakeBackend

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def guarded():
    backend = FakeBackend()
    backend.script = [Reply("Hello", "", 3, 1, "stop")]
    with running_server(Settings(host="127.0.0.1", port=0, served_model_name="tiny", api_keys=KEYS), backend) as url:
        yield url


def _get(url: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.mark.parametrize(
    "headers, says",
    [({}, "no API key"), ({"Authorization": "Bearer wrong"}, "incorrect API key"), ({"Authorization": "key-one"}, "no API key"),
     ({"Authorization": "Basic a2V5LW9uZTo="}, "no API key"), ({"Authorization": "Bearer key-one-and-more"}, "incorrect API key")],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/unknown"])
def test_v1_routes_without_the_right_key_are_401_in_openai_shape(guarded, path, headers, says):
    status, response_headers, body = _get(guarded + path, headers)
    assert status == 401 and response_headers["www-authenticate"] == "Bearer"
    assert body["error"] | {"message": ""} == {"message": "", "type": "AuthenticationError", "param": None, "code": 401}
    assert says in body["error"]["message"] and "key-one" not in body["error"]["message"]


def test_each_configured_key_is_accepted_and_health_stays_open(guarded):
    for key in KEYS:
        client = openai.OpenAI(base_url=guarded + "/v1", api_key=key, max_retries=0)  # sends Authorization: Bearer <key>
        assert client.models.list().data[0].id == "tiny"
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices[0].message.content == "Hello"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded + "/v1", api_key="wrong", max_retries=0).models.list()
    assert _get(guarded + "/health")[0] in (200, 503)  # open: Triton's state, never 401


def test_a_request_without_a_key_is_refused_before_its_body_is_read(guarded):
    connection = http.client.HTTPConnection(guarded.removeprefix("http://"), timeout=5)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(200 * 2**20))
    connection.endheaders()  # no body is ever sent
    response = connection.getresponse()
    assert response.status == 401 and json.loads(response.read())["error"]["code"] == 401
    connection.close()


def test_every_configured_key_is_compared_in_constant_time(guarded, monkeypatch):
    compared, original = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append(b)
        return original(a, b)

    monkeypatch.setattr("openai_api.auth.hmac.compare_digest", compare_digest)
    assert _get(guarded + "/v1/models", {"Authorization": "Bearer key-one"})[0] == 200
    assert sorted(compared) == sorted(key.encode() for key in KEYS)  # also after the first one matched


def test_keys_come_from_the_flags_and_the_environment():
    args = cli.parser().parse_args(["--api-key", "a", "--api-key", "b"])
    assert cli.settings_of(args, {"INTERNVL_API_KEY": "c"}).api_keys == ("a", "b", "c")
    assert cli.settings_of(args, {"INTERNVL_API_KEY": ""}).api_keys == ("a", "b")
    assert cli.settings_of(cli.parser().parse_args([]), {}).api_keys == ()


def test_help_names_the_environment_variable_and_never_shows_a_key(monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_API_KEY", "secret-from-env")
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--api-key" in text and "INTERNVL_API_KEY" in text and "secret-from-env" not in text


def test_tritonserver_does_not_inherit_the_api_key(monkeypatch, tmp_path):
    """The launchers pass their environment on to tritonserver minus INTERNVL_API_KEY (only the OpenAI child needs it)."""
    from launcher.server import TritonServer, server_environment

    monkeypatch.setenv("INTERNVL_API_KEY", "secret-from-env")
    monkeypatch.setenv("UNRELATED_SETTING", "kept")
    environment = TritonServer(tmp_path, 1, 2, 3).environment()
    assert "INTERNVL_API_KEY" not in environment and environment["UNRELATED_SETTING"] == "kept"
    assert "INTERNVL_API_KEY" not in server_environment()


def test_the_soak_tool_sends_its_api_key(guarded):
    from client.soak import OpenAITarget, Unreachable

    assert OpenAITarget(guarded, 4, 10, api_key=KEYS[1]).model == "tiny"
    with pytest.raises(Unreachable, match=r"refused the API key \(HTTP 401\): pass the server's key with --api-key"):
        OpenAITarget(guarded, 4, 10)
