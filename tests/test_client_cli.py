"""The chat CLI and the client against a real tritonserver: image tags, and what they say when
something is wrong (no server, a bad image, invalid sampling values, an error over HTTP streaming)."""

from __future__ import annotations

import json
import re

import pytest

from client.chat import effective_question
from client.chat import main as chat_cli
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient, SamplingParamError, ServerError, ServerUnavailable
from engine.pipeline import Pipeline
from engine.sampling_params import SamplingParams
from launcher.server import free_port

MAX_NEW = 8
IMAGE_A = synthetic_image(11, 640, 400, "PNG")
IMAGE_B = synthetic_image(12, 300, 500, "JPEG")
NOT_AN_IMAGE = b"this is not an image"
DECODE_ERROR = "cannot decode image: not a recognised image format (JPEG, PNG, WebP, BMP, GIF, ...)"


@pytest.fixture(scope="module")
def pipe(tiny):
    with Pipeline.from_pretrained(tiny, vision_backend="onnxruntime") as pipeline:
        yield pipeline


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a.png").write_bytes(IMAGE_A)
    (tmp_path / "b.jpg").write_bytes(IMAGE_B)
    (tmp_path / "broken.jpg").write_bytes(NOT_AN_IMAGE)
    return tmp_path


def _closed_port_url() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


# 9: a first question without tags and several images


def test_chat_two_images_without_tags_gets_one_tag_per_image(server, pipe, files, capsys):
    history_file = files / "chat.json"
    images = ["--image", str(files / "a.png"), "--image", str(files / "b.jpg")]
    common = ["--url", server.grpc_url, *images, "--max-tokens", str(MAX_NEW), "--history", str(history_file)]

    assert chat_cli([*common, "Compare them."]) == 0
    first, expected_history = pipe.chat("Compare them.", [IMAGE_A, IMAGE_B], max_new_tokens=MAX_NEW, return_history=True)
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.strip() == first
    # the CLI records the question as the server does: one tag per image, in front
    assert expected_history[0][0] == "<image>\n<image>\nCompare them."
    assert json.loads(history_file.read_text()) == [["<image>\n<image>\nCompare them.", first]]
    assert effective_question("Compare them.", [IMAGE_A, IMAGE_B], None) == expected_history[0][0]

    # the follow-up turn reuses the recorded tags with the same two images
    assert chat_cli([*common, "Which is larger?"]) == 0
    second = pipe.chat("Which is larger?", [IMAGE_A, IMAGE_B], expected_history, max_new_tokens=MAX_NEW)
    assert capsys.readouterr().out.strip() == second


def test_effective_question_keeps_tagged_questions_and_later_turns():
    assert effective_question("Describe.", [b"x"], None) == "<image>\nDescribe."
    assert effective_question("Image-1: <image>\nImage-2: <image>\nCompare.", [b"x", b"y"], None).startswith("Image-1")
    assert effective_question("And now?", [b"x", b"y"], [["<image>\n<image>\nCompare.", "..."]]) == "And now?"
    assert effective_question("Hi", [], None) == "Hi"


# 10a: no server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_chat_without_server_says_no_server_answers(protocol, capsys):
    url = _closed_port_url()
    flags = ["--http"] if protocol == "http" else []
    assert chat_cli([*flags, "--url", url, "--max-tokens", "4", "Hello"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"error: no server answers at {url} (start one with `make serve`, or pass --url")
    assert out.err.count("\n") == 1  # one line
    with pytest.raises(ServerUnavailable, match=f"^no server answers at {url}$") as caught:
        InternVLClient(url, protocol).chat("Hello", max_tokens=4)
    assert isinstance(caught.value, ConnectionError)


def test_chat_to_the_other_protocols_port_says_no_server_answers(server, capsys):
    # gRPC to the HTTP port and HTTP to the gRPC port: nothing there speaks that protocol
    assert chat_cli(["--url", server.http_url, "--max-tokens", "4", "Hello"]) == 1
    assert capsys.readouterr().err.startswith(f"error: no server answers at {server.http_url} (")
    assert chat_cli(["--http", "--url", server.grpc_url, "--max-tokens", "4", "Hello"]) == 1
    assert capsys.readouterr().err.startswith(f"error: no server answers at {server.grpc_url} (")


def test_http_url_may_carry_its_scheme(server, capsys):
    assert chat_cli(["--http", "--url", f"http://{server.http_url}/", "--max-tokens", "4", "Hello"]) == 0
    assert capsys.readouterr().out.strip()
    assert chat_cli(["--url", f"http://{server.grpc_url}", "--max-tokens", "4", "Hello"]) == 2  # gRPC: no scheme
    assert capsys.readouterr().err == f"error: --url http://{server.grpc_url}: gRPC takes host:port without a scheme (for HTTP, add --http)\n"


def test_http_to_the_openai_or_metrics_port_says_it_is_not_triton(server, capsys):
    from openai_api.server import running_server
    from openai_api.settings import Settings

    with running_server(Settings(triton_url=server.grpc_url, port=0)) as openai_url:
        openai_port = openai_url.removeprefix("http://")
        for url in (openai_port, f"127.0.0.1:{server.metrics_port}"):
            assert chat_cli(["--http", "--url", url, "--max-tokens", "4", "Hello"]) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"error: {url} is not Triton's HTTP port: it answered HTTP 40") and err.count("\n") == 1, err


def test_a_stream_that_fails_midway_puts_the_error_on_its_own_line(capsys, monkeypatch):
    def stream(self, question, images=(), keep_empty=False, **kwargs):
        yield "partial reply"
        raise ServerError("the server went away")

    monkeypatch.setattr(InternVLClient, "stream", stream)
    assert chat_cli(["--max-tokens", "4", "Hello"]) == 1
    out = capsys.readouterr()
    assert out.out == "partial reply\n" and out.err == "error from server: the server went away\n"


def test_max_tokens_default_is_shown(capsys):
    with pytest.raises(SystemExit):
        chat_cli(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "most tokens to generate (default: 512;" in help_text and "the ensemble's name (default: internvl)" in help_text


# 10b: errors over HTTP streaming


def test_http_stream_error_has_no_sse_framing(server):
    expected = f"ImageError: image 0: {DECODE_ERROR}"
    messages = {}
    for mode, client, stream in [
        ("grpc-stream", InternVLClient(server.grpc_url), True),
        ("http", InternVLClient(server.http_url, "http"), False),
        ("http-stream", InternVLClient(server.http_url, "http"), True),
    ]:
        with pytest.raises(ServerError) as caught:
            client.chat("Describe.", [NOT_AN_IMAGE], stream=stream, max_tokens=4)
        messages[mode] = str(caught.value)
    # the same one line whatever the transport: no `data: {"error": ...}` event framing, no
    # Triton "in ensemble 'internvl', " prefix
    assert messages == {mode: expected for mode in messages}


# 10c: image errors name the file


@pytest.mark.parametrize("flags", [[], ["--http"], ["--http", "--no-stream"]], ids=["grpc", "http-stream", "http"])
def test_chat_image_error_names_the_file(server, files, capsys, flags):
    url = server.http_url if "--http" in flags else server.grpc_url
    broken = files / "broken.jpg"
    argv = [*flags, "--url", url, "--image", str(files / "a.png"), "--image", str(broken), "--max-tokens", "4", "Compare."]
    assert chat_cli(argv) == 1
    err = capsys.readouterr().err
    assert err == f"error from server: ImageError: {broken}: {DECODE_ERROR}\n"


def test_chat_missing_image_file_is_named_before_connecting(files, capsys):
    missing = files / "missing.png"
    assert chat_cli(["--url", _closed_port_url(), "--image", str(missing), "Hi"]) == 1
    assert capsys.readouterr().err == f"error: cannot read image {missing}: No such file or directory\n"


# 10d: sampling values, one rule set for the client and the server


@pytest.mark.parametrize(
    "flags, request_fields",
    [
        (["--temperature", "-1"], {"temperature": -1.0}),
        (["--top-p", "2"], {"top_p": 2.0}),
        (["--top-k", "-3"], {"top_k": -3}),
        (["--repetition-penalty", "0"], {"repetition_penalty": 0.0}),
        (["--max-tokens", "0"], {}),
    ],
    ids=["temperature-1", "top_p-2", "top_k-3", "penalty-0", "max_tokens-0"],
)
def test_negative_temperature_is_rejected_like_top_p_2(flags, request_fields, capsys):
    """Every invalid sampling flag fails locally (no server needed: the URL is closed) with the
    message of the rules the server applies, on one line, exit status 2."""
    max_tokens = 0 if "--max-tokens" in flags else 512
    with pytest.raises(SamplingParamError) as rule:
        SamplingParams.from_request(max_tokens, **request_fields)
    assert chat_cli(["--url", _closed_port_url(), *flags, "Hi"]) == 2
    out = capsys.readouterr()
    assert out.err == f"error: {rule.value}\n"
    assert "SamplingParams(" not in out.err
    with pytest.raises(SamplingParamError, match=f"^{re.escape(str(rule.value))}$"):
        InternVLClient(_closed_port_url()).chat("Hi", max_tokens=max_tokens, **request_fields)


def test_negative_temperature_message_names_the_rule():
    with pytest.raises(SamplingParamError) as negative:
        InternVLClient(_closed_port_url()).chat("Hi", temperature=-1.0)
    assert re.fullmatch(r"temperature must be ≥ 0 \(0 = greedy\), got -1(\.0)?", str(negative.value))
    with pytest.raises(SamplingParamError) as top_p:
        InternVLClient(_closed_port_url(), "http").stream("Hi", top_p=2.0)
    assert re.fullmatch(r"top_p must be in \[0, 1\] \(0 = off\), got 2(\.0)?", str(top_p.value))


@pytest.mark.parametrize("fields", [{"temperature": -1.0}, {"top_p": 2.0}], ids=["temperature-1", "top_p-2"])
def test_server_rejects_sampling_values_with_the_clients_message(server, fields):
    """The ensemble's llm step applies the same rules: unchecked by the client, the server refuses
    the request with the message the client gives locally."""
    with pytest.raises(SamplingParamError) as local:
        SamplingParams.from_request(4, **fields)
    unchecked = InternVLClient(server.grpc_url, check_sampling=False)
    with pytest.raises(ServerError) as served:
        unchecked.chat("Hi", max_tokens=4, **fields)
    assert str(served.value) == f"SamplingParamError: {local.value}"
