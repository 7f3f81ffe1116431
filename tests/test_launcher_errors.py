"""`make serve` failures end in one line that says what to do (and a failing model's own error
lines), never in a traceback; what can be checked before loading is."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from build.repository import build
from launcher.server import free_port

FLAGS = ("--http-port", "--grpc-port", "--metrics-port")


def _serve(out: Path, ports: dict[str, int] | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    ports = ports or {flag: free_port() for flag in FLAGS}
    command = [sys.executable, "-m", "launcher.server", "--out", str(out)]
    for flag, port in ports.items():
        command += [flag, str(port)]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - started


def _fake_repository(out: Path) -> None:
    """Enough of a build for the launcher's checks; tritonserver would fail to load it."""
    model = out / "model_repository" / "internvl"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "internvl"\nplatform: "ensemble"\n')


def test_serve_without_a_repository_says_run_make_build_and_creates_nothing(tmp_path):
    result, _ = _serve(tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: no model repository in {tmp_path}: run `make build OUT={tmp_path}` first\n"
    assert not any(tmp_path.iterdir())  # in particular no OUT/backends


def test_serve_refuses_a_gpu_build_in_one_line(tmp_path):
    _fake_repository(tmp_path)
    (tmp_path / "build.json").write_text('{"target": "gpu", "values": {}}')
    result, _ = _serve(tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {tmp_path} holds a GPU build: serve it inside the TensorRT-LLM container with `make serve TARGET=gpu OUT={tmp_path}`"]


def test_serve_after_the_checkpoint_moved_says_so_in_one_line_at_once(tiny, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny, checkpoint)
    build(checkpoint, tmp_path / "out")
    checkpoint.rename(tmp_path / "moved")
    result, seconds = _serve(tmp_path / "out")
    assert result.returncode == 2 and seconds < 20, (result.stderr, seconds)  # before tritonserver starts
    assert result.stderr.splitlines() == [
        f"error: the build in {tmp_path / 'out'} was made from the checkpoint {checkpoint}, which is not there any more "
        f"(moved or deleted after `make build`?): put it back, or rebuild with `make build MODEL=<its path> OUT={tmp_path / 'out'}`"
    ]


@pytest.mark.parametrize("busy_flag", FLAGS)
def test_serve_on_a_busy_port_names_port_and_flag_before_loading(tmp_path, busy_flag):
    _fake_repository(tmp_path)
    ports = {flag: free_port() for flag in FLAGS}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", ports[busy_flag]))
        listener.listen()
        result, seconds = _serve(tmp_path, ports)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: port {ports[busy_flag]} ({busy_flag}) is already in use on 127.0.0.1")
    assert seconds < 10  # no model was loaded
    assert not (tmp_path / "backends").exists() and not (tmp_path / "tritonserver.log").exists()


def test_serve_with_the_same_port_twice_says_so(tmp_path):
    _fake_repository(tmp_path)
    port = free_port()
    result, _ = _serve(tmp_path, {"--http-port": port, "--grpc-port": port, "--metrics-port": free_port()})
    assert result.returncode == 2
    assert result.stderr == f"error: --http-port and --grpc-port are both {port}: give each its own port\n"


def test_model_load_failure_shows_its_error_lines_without_a_log_file_or_traceback(tiny, tmp_path):
    build(tiny, tmp_path)
    config = tmp_path / "model_repository" / "llm" / "config.pbtxt"
    # a setting only the model itself refuses (a missing checkpoint is caught before tritonserver starts)
    text = config.read_text()
    assert 'key: "llm_weights" value: { string_value: "float32" }' in text
    config.write_text(text.replace('key: "llm_weights" value: { string_value: "float32" }', 'key: "llm_weights" value: { string_value: "no-such-precision" }'))
    result, _ = _serve(tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # after tritonserver's own log (passed through), the launcher's summary: one line, then the model's errors
    summary = result.stderr[result.stderr.index("error: tritonserver exited") :]
    first, *errors = summary.splitlines()
    assert "llm failed to load" in first and str(tmp_path / "tritonserver.log") in first
    assert any("failed to load 'llm'" in line for line in errors)
    assert any("no-such-precision" in line for line in errors)
