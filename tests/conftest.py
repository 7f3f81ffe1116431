"""Session fixtures: tiny generated checkpoints (qwen2, qwen3, llama) with their vision ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from build.checkpoint import generate
from engine.vision_export import ensure_vision_onnx
from build.repository import build
from build.settings import BuildSettings
from engine.vision import default_onnx_path
from launcher.server import TritonServer, free_port

LLM_FAMILIES = ("qwen2", "qwen3", "llama")
pytest_plugins = ["tests.skip_guard"]  # a skip other than "no GPU" fails the run


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA and TensorRT; on the CPU machines of this project they skip."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and TensorRT (GPU path); none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Lazily generated tiny checkpoints, keyed by LLM family; each with its vision ONNX."""
    root = tmp_path_factory.mktemp("checkpoints")

    def make(family: str) -> Path:
        path = generate("tiny", family, root / f"tiny-{family}", seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert ensure_vision_onnx(path, log=lambda message: None) == default_onnx_path(path)
        return path

    return _LazyDict(make)


class _LazyDict(dict):
    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = self._make(key)
        return self[key]


@pytest.fixture(scope="session")
def tiny(checkpoints) -> Path:
    return checkpoints["qwen3"]


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    """A real tritonserver on the tiny checkpoint's repository; 2 images × 13 tiles, 8 MiB of images per request."""
    out = tmp_path_factory.mktemp("build")
    build(tiny, out, BuildSettings(max_images=2, llm_max_batch_size=8, max_request_bytes=8 * 2**20))
    with TritonServer(out, free_port(), free_port(), free_port(), log_file=out / "tritonserver.log") as server:
        yield server
