"""The `gpu` extra installs what the GPU build path imports (issue 12, defect 3: build/vision_parity.py
imported onnxruntime, which nothing in the TensorRT-LLM container's install provided)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_PATH = ("build/vision_parity.py", "build/trt_vision.py", "build/trtllm_engine.py", "build/llm_checkpoint.py", "build/export_vision.py")
# tensorrt-llm 1.2.1's own requirements bring these (pyproject.toml says so); import name -> distribution
BROUGHT_BY_TENSORRT_LLM = {"torch", "transformers", "tokenizers", "onnx", "numpy", "safetensors"}
DISTRIBUTION = {"PIL": "pillow", "google": "protobuf", "tritonclient": "tritonclient", "onnxruntime": "onnxruntime", "tensorrt_llm": "tensorrt-llm"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_defect_gpu_extra_installs_every_module_the_gpu_build_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["gpu"]
    installed = {re.split(r"[=<>\[ ]", p)[0].lower() for p in pins}
    ours = {"build", "engine", "triton_repo", "client"}
    for file in GPU_PATH:
        for name in _imports(ROOT / file) - ours - set(sys.stdlib_module_names) - BROUGHT_BY_TENSORRT_LLM:
            assert DISTRIBUTION.get(name, name).replace("_", "-") in installed, f"{file} imports {name}, which the gpu extra does not install"
