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

from launcher.server import free_port

ROOT = Path(__file__).resolve().parents[1]
def test_gpu_launcher_serves_the_openai_api_beside_triton_and_stops_both(tmp_path):
    out = tmp_path / "build-gpu"
    (out / "model_repository").mkdir(parents=True)
    (out / "build.json").write_text(json.dumps({"target": "gpu", "values": {"tp_size": 1, "pp_size": 1}}))
    stand_in = tmp_path / "tritonserver"
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m tests.config_triton \"$@\"\n")  # PYTHONPATH: the launcher's
    stand_in.chmod(0o755)
    http, grpc, metrics, openai = (str(free_port()) for _ in range(4))
    command = [sys.executable, "-m", "launcher.gpu", "--out", str(out), "--tritonserver", str(stand_in),
               "--http-port", http, "--grpc-port", grpc, "--metrics-port", metrics, "--openai-port", openai]  # fmt: skip
    env = {**os.environ, "STAND_IN_PID": str(tmp_path / "stand_in.pid")}
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
    stand_in_pid = int((tmp_path / "stand_in.pid").read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{stand_in_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{stand_in_pid}").exists(), "the server outlived the launcher"
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{openai}/health", timeout=2)
        raise AssertionError("the OpenAI server outlived the launcher")
    except OSError:
        pass
