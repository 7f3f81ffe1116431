"""The GPU path is written against one toolchain (docs/GPU.md, Versions): TensorRT-LLM 1.2.1 with
TensorRT 10.14 in nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3. TensorRT-LLM's main branch has
since removed the TensorRT-engine flow it builds on, so the GPU build refuses a newer TensorRT-LLM
(or TensorRT) in one line before any work, and the Dockerfile, the gpu extra and the docs name the
same versions as the check."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from build.gpu_toolchain import TENSORRT, TENSORRT_LLM, TRITON_IMAGE, check_version
from build.settings import BuildSettings, GpuSettings

ROOT = Path(__file__).resolve().parents[1]


def _fake_toolchain(monkeypatch, tensorrt_llm: str, tensorrt: str = "10.14.1.48") -> None:
    for name, version in (("tensorrt_llm", tensorrt_llm), ("tensorrt", tensorrt)):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())


def test_the_gpu_build_refuses_a_newer_tensorrt_llm_in_one_line_before_any_work(tiny, tmp_path, monkeypatch):
    from build.repository import build_gpu

    _fake_toolchain(monkeypatch, tensorrt_llm="1.3.0")
    with pytest.raises(RuntimeError) as refused:
        build_gpu(tiny, tmp_path, BuildSettings(), GpuSettings())
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("tensorrt_llm 1.3.0 is newer than 1.2.1")
    assert "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3" in message and "docs/GPU.md" in message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("version", ["1.2.1", "1.2.1.post1", "1.2.0"])
def test_tensorrt_llm_up_to_1_2_1_passes_the_check(version):
    check_version("tensorrt_llm", version)


@pytest.mark.parametrize(("package", "version"), [("tensorrt_llm", "1.2.2"), ("tensorrt_llm", "1.3.0rc13"), ("tensorrt_llm", "2.0.0"), ("tensorrt", "10.15.0.1"), ("tensorrt", "11.0.0")])
def test_newer_releases_and_release_candidates_are_refused(package, version):
    with pytest.raises(RuntimeError, match=rf"^{package} {re.escape(version)} is newer than"):
        check_version(package, version)


def test_tensorrt_within_tensorrt_llm_s_own_requirement_passes():
    """tensorrt-llm 1.2.1 requires tensorrt~=10.14.1: a later 10.14 patch is within it."""
    check_version("tensorrt", "10.14.1.48")
    check_version("tensorrt", "10.14.2.1")


def test_the_dockerfile_the_gpu_extra_and_the_docs_name_the_checked_versions():
    assert (TENSORRT_LLM, TENSORRT, TRITON_IMAGE) == ("1.2.1", "10.14.1.48", "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3")
    dockerfile = (ROOT / "Dockerfile.gpu").read_text(encoding="utf-8")
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [TRITON_IMAGE]
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["gpu"]
    assert {f"tensorrt-llm=={TENSORRT_LLM}", f"tensorrt=={TENSORRT}"} <= set(gpu_extra)
    versions = (ROOT / "docs" / "GPU.md").read_text(encoding="utf-8").split("## Versions", 1)[1].split("\n## ", 1)[0]
    assert all(v in versions for v in (TENSORRT_LLM, TENSORRT, TRITON_IMAGE, "#15907", "#16369", "#4225", "llmapi"))
