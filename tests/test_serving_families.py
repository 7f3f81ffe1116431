"""Through tritonserver, families beyond the dense default: a Qwen3-MoE checkpoint builds with the
repository builder and answers over gRPC streaming exactly as in-process (issue 11)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from build.repository import build
from build.settings import BuildSettings
from client.synthetic import synthetic_image
from client.triton_client import InternVLClient
from engine.pipeline import Pipeline
from triton_repo.server import TritonServer, free_port

IMAGES = [synthetic_image(11, 640, 400, "PNG"), synthetic_image(12, 300, 500, "JPEG")]
REQUESTS = [  # (question, images, max tokens)
    ("Hello, who are you?", [], 10),
    ("Describe the image.", IMAGES[:1], 12),
    ("Image-1: <image>\nImage-2: <image>\nWhat differs?", IMAGES, 8),
    ("What is in the picture?", IMAGES[1:], 14),
]


@pytest.fixture(scope="module")
def moe_server(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("build-moe")
    build(checkpoints["qwen3_moe"], out, BuildSettings(max_images=2))
    with TritonServer(out, free_port(), free_port(), free_port()) as server:
        yield server


def test_moe_checkpoint_served_equals_in_process_also_when_batched(moe_server, checkpoints):
    with Pipeline.from_pretrained(checkpoints["qwen3_moe"]) as pipe:
        expected = [pipe.chat(q, images, max_new_tokens=n) for q, images, n in REQUESTS]
    assert len(set(expected)) == len(expected)  # input-sensitive: every request has its own reply
    client = InternVLClient(moe_server.grpc_url)
    assert [client.chat(q, images, stream=True, max_tokens=n) for q, images, n in REQUESTS] == expected
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # the MoE layers route the shared batch
        batched = list(pool.map(lambda r: client.chat(r[0], r[1], stream=True, max_tokens=r[2]), REQUESTS))
    assert batched == expected
