"""`make serve TARGET=gpu` serves the OpenAI-compatible API as the CPU launcher does: launcher.gpu
--openai-port starts it once Triton is ready and stops both on SIGTERM. The container's tritonserver
is replaced by a stand-in that answers Triton's readiness over HTTP and gRPC (tests/config_triton.py;
no GPU here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from launcher.server import free_port, port_in_use

ROOT = Path(__file__).resolve().parents[1]
def _stand_in(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A GPU build directory and a stand-in tritonserver. -> (build dir, launcher.gpu's flags for it, env)"""
    out = tmp_path / "build-gpu"
    (out / "model_repository").mkdir(parents=True)
    (out / "build.json").write_text(json.dumps({"target": "gpu", "values": {"tp_size": 1, "pp_size": 1}}))
    stand_in = tmp_path / "tritonserver"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m tests.config_triton \"$@\"\n")  # PYTHONPATH: the launcher's
    stand_in.chmod(0o755)
    flags = ["--out", str(out), "--tritonserver", str(stand_in)]
    return out, flags, {**os.environ, "STAND_IN_PID": str(tmp_path / "stand_in.pid")}


def _wait_gone(pid_file: Path, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pid_file.is_file() and not Path(f"/proc/{pid_file.read_text()}").exists():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_launcher_takes_its_server_with_it(tmp_path):
    """SIGKILL cannot be handled: the servers (Triton's and the OpenAI one) learn of their launcher's death
    from the kernel (PDEATHSIG)."""
    _, flags, env = _stand_in(tmp_path)
    ports = [str(free_port()) for _ in range(4)]
    command = [sys.executable, "-m", "launcher.gpu", *flags, "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2], "--openai-port", ports[3]]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert next((line for line in launcher.stdout if line.startswith("ready:")), "")
    launcher.kill()
    launcher.wait()
    assert _wait_gone(tmp_path / "stand_in.pid"), "the server outlived its killed launcher"
    deadline = time.monotonic() + 10
    while port_in_use("127.0.0.1", int(ports[3])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not port_in_use("127.0.0.1", int(ports[3])), "the OpenAI API server outlived its killed launcher"


def test_gpu_launcher_serves_the_openai_api_beside_triton_and_stops_both(tmp_path):
    _, flags, env = _stand_in(tmp_path)
    http, grpc, metrics, openai = (str(free_port()) for _ in range(4))
    command = [sys.executable, "-m", "launcher.gpu", *flags, "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics, "--openai-port", openai]
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = next((line for line in launcher.stdout if line.startswith("ready:")), "")  # after uvicorn's lines
        assert line.startswith("ready:") and f"OpenAI http://127.0.0.1:{openai}/v1" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{openai}/health", timeout=5) as health:
            assert health.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{openai}/v1/models", timeout=5) as models:
            assert [m["id"] for m in json.load(models)["data"]] == ["tiny-gpu"]  # read from Triton's config
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
    finally:
        launcher.kill()
        launcher.wait()
    assert _wait_gone(tmp_path / "stand_in.pid"), "the server outlived the launcher"
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{openai}/health", timeout=2)
        raise AssertionError("the OpenAI server outlived the launcher")
    except OSError:
        pass
