"""Through tritonserver, checkpoints beyond the HF-native dense default: a Qwen3-MoE one, a GPT-OSS
one (its replies decoded with special tokens kept, as its chat() does), a custom-format
(skywork_chat, InternViT-6B-style tower, pixel shuffle v1) one and an InternVL3.5-Flash one build with the repository builder and
answer over gRPC streaming exactly as in-process (issue 11)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from build.checkpoint import generate
from build.repository import build
from build.settings import BuildSettings
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from launcher.server import TritonServer, free_port

IMAGES = [synthetic_image(11, 640, 400, "PNG"), synthetic_image(12, 300, 500, "JPEG")]
REQUESTS = [  # (question, images, max tokens)
    ("Hello, who are you?", [], 10),
    ("Describe the image.", IMAGES[:1], 12),
    ("Image-1: <image>\nImage-2: <image>\nWhat differs?", IMAGES, 8),
    ("What is in the picture?", IMAGES[1:], 14),
]


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss", "custom-skywork-6b", "custom-flash"])
def served(request, checkpoints, tmp_path_factory):
    """-> (checkpoint, a tritonserver on its repository)."""
    if request.param in ("qwen3_moe", "gpt_oss"):
        checkpoint = checkpoints[request.param]
    elif request.param == "custom-flash":  # tiles routed per request; the LLM drops the compressed positions
        checkpoint = generate("tiny", "qwen3", tmp_path_factory.mktemp("flash") / "ckpt", fmt="custom", flash=True)
    else:
        checkpoint = generate(
            "tiny", "qwen2", tmp_path_factory.mktemp("custom") / "ckpt", fmt="custom", ps_version="v1",
            vision="internvit-6b", model_type="skywork_chat",
        )  # fmt: skip
    out = tmp_path_factory.mktemp("build")
    build(checkpoint, out, BuildSettings(max_images=2))
    with TritonServer(out, free_port(), free_port(), free_port()) as server:
        yield checkpoint, server


def test_served_equals_in_process_also_when_batched(served):
    checkpoint, server = served
    with Pipeline.from_pretrained(checkpoint) as pipe:
        expected = [pipe.chat(q, images, max_new_tokens=n) for q, images, n in REQUESTS]
    assert len(set(expected)) == len(expected)  # input-sensitive: every request has its own reply
    client = InternVLClient(server.grpc_url)
    assert [client.chat(q, images, stream=True, max_tokens=n) for q, images, n in REQUESTS] == expected
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # requests share engine steps (and MoE routing)
        batched = list(pool.map(lambda r: client.chat(r[0], r[1], stream=True, max_tokens=r[2]), REQUESTS))
    assert batched == expected
