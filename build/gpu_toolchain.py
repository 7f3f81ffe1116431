"""The toolchain the GPU path is written against, in one place (docs/GPU.md, Versions): Dockerfile.gpu's
base image and the `gpu` extra's pins name these (tests/test_gpu_toolchain.py checks that they do),
and the GPU build refuses a newer TensorRT-LLM or TensorRT before any work.

Why newer is refused: TensorRT-LLM's main branch removed the TensorRT-engine flow this path builds on —
the C++ `tensorrtllm` Triton backend and its model templates (NVIDIA/TensorRT-LLM PR #15907), the
engine builder's Python modules (#15918) and the C++ engine runtime (#16369) — so a newer release
would fail half-way through a build, or at serving time, instead of saying so up front.
"""

from __future__ import annotations

import re

TENSORRT_LLM = "1.2.1"
TENSORRT = "10.14.1.48"  # the container's; tensorrt-llm 1.2.1 requires tensorrt~=10.14.1
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"  # ships both (so do 26.05–26.07)

# package -> (supported version, how many leading release numbers a newer one differs in)
_SUPPORTED = {"tensorrt_llm": (TENSORRT_LLM, 3), "tensorrt": (TENSORRT, 2)}


def check_version(package: str, installed: str) -> None:
    """RuntimeError, one line, when `installed` is newer than the supported release of `package`;
    a pre-release of a newer release (1.3.0rc13) counts as newer."""
    supported, parts = _SUPPORTED[package]
    if _release(installed, parts) > _release(supported, parts):
        raise RuntimeError(
            f"{package} {installed} is newer than {supported}, the version the GPU path is written for "
            f"(TensorRT-LLM's main branch has removed the TensorRT-engine flow it builds on): build inside "
            f"{TRITON_IMAGE} (TensorRT-LLM {TENSORRT_LLM}, TensorRT {TENSORRT}); docs/GPU.md, Versions"
        )


def _release(version: str, parts: int) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:parts])
