"""Every tool's --help describes each flag with its default and lists only the flags the tool
reads; `make ... TARGET=gpu` refuses to run (and to pip-install) outside the TensorRT-LLM container."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("build.repository", "build.trt_vision", "build.trtllm_engine", "build.vision_parity", "build.manifests", "launcher.server", "launcher.gpu", "openai_api.__main__", "client.soak")
REQUIRED = {"--model", "--out", "--plan"}
SWITCHES = {"--help", "--print-only", "--lws"}


def _help(module: str, monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main()
    assert exit.value.code == 0
    return capsys.readouterr().out


def _flag_help(text: str) -> dict[str, str]:
    """--flag -> its help text, from argparse's option listing."""
    flags, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"\s{2}(-\w, )?(--[\w-]+)(.*)", line)
        if match:
            current = match.group(2)
            flags[current] = match.group(3)
        elif current and line.startswith(" " * 8):
            flags[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in flags.items()}


@pytest.mark.parametrize("module", TOOLS)
def test_help_gives_every_flag_a_description_and_its_default(module, monkeypatch, capsys):
    flags = _flag_help(_help(module, monkeypatch, capsys))
    assert "--help" in flags and len(flags) > 2
    for flag, text in flags.items():
        described = re.sub(r"^[A-Z_]+|^\{[^}]*\}", "", text.strip()).strip()
        assert described, f"{module} {flag} has no description"
        if flag not in REQUIRED | SWITCHES:
            assert "default" in described, f"{module} {flag} does not say its default: {described!r}"


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        # the vision plan's profile needs the tiles per run only
        ("build.trt_vision", {"--preprocess-instances", "--llm-max-batch-size", "--max-num-tokens", "--text-budget", "--max-output-len", "--vision-queue-delay-us", "--tp-size", "--llm-gpus"}),
        # the engine needs its limits and the rank layout, not how Triton places and schedules it
        ("build.trtllm_engine", {"--preprocess-instances", "--max-batch-size", "--vision-queue-delay-us", "--vision-gpus", "--vision-instances", "--llm-gpus", "--kv-cache-free-gpu-mem-fraction", "--batch-scheduler-policy", "--enable-kv-cache-reuse"}),
        ("build.vision_parity", {"--max-images", "--max-batch-size", "--tp-size"}),
    ],
)
def test_gpu_tools_list_only_the_flags_they_use(module, absent, monkeypatch, capsys):
    flags = _flag_help(_help(module, monkeypatch, capsys))
    assert not absent & set(flags)


def test_repository_help_separates_gpu_only_flags(monkeypatch, capsys):
    text = _help("build.repository", monkeypatch, capsys)
    both, gpu_only = text.split("options:", 1)[1].split("GPU target only (--target gpu):", 1)
    assert "--preprocess-instances" in both and "--tp-size" not in both
    assert {"--tp-size", "--llm-gpus", "--quantization"} <= set(_flag_help("options:" + gpu_only))


def test_cpu_build_refuses_gpu_flags(tiny, tmp_path, monkeypatch, capsys):
    from build import repository

    monkeypatch.setattr(sys, "argv", ["build.repository", "--model", str(tiny), "--out", str(tmp_path), "--tp-size", "2"])
    with pytest.raises(SystemExit) as exit:
        repository.main()
    assert exit.value.code == 2
    assert capsys.readouterr().err == "error: --tp-size is for --target gpu only (make build TARGET=gpu)\n"
    assert not any(tmp_path.iterdir())


def _fake_python(tmp_path: Path) -> Path:
    """A python3 without site-packages (so without tensorrt_llm, wherever the test runs) that
    refuses pip and records that it was asked."""
    script = tmp_path / "python3"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"-m pip"*) touch "{tmp_path}/pip-was-run"; exit 97;; esac\n'
        f'exec "{sys.executable}" -S "$@"\n'
    )
    script.chmod(0o755)
    return script


def _make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize(
    ("target", "where", "says"),
    [
        ("setup", {"TRITONSERVER": "/nonexistent/tritonserver"}, "/nonexistent/tritonserver is missing here"),  # not in the container
        ("setup", {"TRITONSERVER": "/bin/true"}, "has none: set PY= to the container's python3"),  # a python without tensorrt_llm
        ("build", {"TRITONSERVER": "/bin/true"}, "has none: set PY= to the container's python3"),
        ("serve", {"TRITONSERVER": "/bin/true"}, "has none: set PY= to the container's python3"),
    ],
)
def test_make_target_gpu_outside_the_container_says_so_and_installs_nothing(tmp_path, target, where, says):
    python, stamp = _fake_python(tmp_path), ROOT / ".gpu-installed"
    stamp_before = stamp.exists() and stamp.stat().st_mtime
    result = _make(target, "TARGET=gpu", f"PY={python}", *(f"{k}={v}" for k, v in where.items()))
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if not line.startswith("make: ***")]
    assert line.startswith("TARGET=gpu ") and says in line
    assert not (tmp_path / "pip-was-run").exists()
    assert (stamp.exists() and stamp.stat().st_mtime) == stamp_before


def test_make_target_gpu_has_its_own_out():
    gpu = _make("-n", "build", "serve", "TARGET=gpu", "PY=python3").stdout
    cpu = _make("-n", "build", "serve").stdout
    assert "--out artifacts/build-gpu " in gpu and "--out artifacts/build-gpu" not in cpu
    assert "--out artifacts/build " in cpu


@pytest.mark.parametrize(
    "module",
    ["build.checkpoint", "build.train_demo", "client.demo", "client.bench", "client.chat", "client.soak", "bench_components.seed_reference",
     "bench_components.peers", "bench_components.peers_requests", "bench_components.llama_server_build", *TOOLS],
)  # fmt: skip
def test_usage_names_the_command_that_runs_the_tool(module, monkeypatch, capsys):
    """`usage: bench.py …` sent newcomers looking for a file to run: each says `python -m <module>`."""
    usage = _help(module, monkeypatch, capsys).split("\n", 1)[0]
    command = "python -m openai_api" if module == "openai_api.__main__" else f"python -m {module}"
    assert usage.startswith(f"usage: {command} "), usage
