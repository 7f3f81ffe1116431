"""Thinking replies split into reasoning and content through tritonserver and the OpenAI server, streamed
or not, with the opening tag in the reply and with the prompt opening it (issue 13), on checkpoints
that always think (tests/thinking_checkpoint.py)."""

from __future__ import annotations

import base64

import pytest
from openai import OpenAI

from build.repository import build
from build.settings import BuildSettings
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from engine.reasoning import THINK_END, THINK_START
from openai_api.server import running_server
from openai_api.settings import Settings
from tests.thinking_checkpoint import thinking_checkpoint
from launcher.server import TritonServer, free_port

IMAGE = synthetic_image(21, 500, 300, "PNG")
QUESTION = "Describe the image."


@pytest.fixture(scope="module", params=["tag-in-reply", "prompt-opens-tag"])
def thinking(request, tiny, tmp_path_factory):
    """-> (checkpoint, expected reasoning, expected content, OpenAI client, Triton client)."""
    opens_tag = request.param == "prompt-opens-tag"
    checkpoint, reasoning, content = thinking_checkpoint(tiny, tmp_path_factory.mktemp("thinking") / "ckpt", opens_tag)
    out = tmp_path_factory.mktemp("build")
    build(checkpoint, out, BuildSettings(max_images=1))
    with TritonServer(out, free_port(), free_port(), free_port()) as server:
        with running_server(Settings(triton_url=server.grpc_url, port=0)) as url:
            yield checkpoint, reasoning, content, OpenAI(base_url=f"{url}/v1", api_key="unused"), InternVLClient(server.grpc_url)


def _messages():
    data = base64.b64encode(IMAGE).decode()
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}, {"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": parts}]


def test_in_process_reference_splits(thinking):
    checkpoint, reasoning, content, _, _ = thinking
    with Pipeline.from_pretrained(checkpoint, vision_backend="onnxruntime") as pipe:
        result = pipe.generate(QUESTION, [IMAGE], max_new_tokens=10)
    assert result.text.count(THINK_END) == 1 and result.finish_reason == "stop"
    assert (result.reasoning_content, result.content) == (reasoning, content) and reasoning != content


def test_triton_outputs_split_streamed_and_not(thinking):
    _, reasoning, content, _, client = thinking
    for stream in (True, False):
        reply = client.generate(QUESTION, [IMAGE], stream=stream, max_tokens=10)
        assert (reply.reasoning, reply.content, reply.finish_reason) == (reasoning, content, "stop")
        assert THINK_END in reply.text  # the raw text keeps the tags


def test_openai_message_and_stream_deltas_split(thinking):
    checkpoint, reasoning, content, openai, _ = thinking
    model = checkpoint.name
    completion = openai.chat.completions.create(model=model, messages=_messages(), max_tokens=10)
    message = completion.choices[0].message
    assert (message.reasoning_content, message.content, completion.choices[0].finish_reason) == (reasoning, content, "stop")
    chunks = list(openai.chat.completions.create(model=model, messages=_messages(), max_tokens=10, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    pieces = [getattr(d, "reasoning_content", None) or "" for d in deltas] + [d.content or "" for d in deltas]
    assert not any(tag in piece for piece in pieces for tag in (THINK_START, THINK_END, "<think", "</"))
