"""`make serve`: the launcher stops cleanly on SIGTERM and reports a model's load error.
(Stopping at any moment: test_launcher_stop.py; one-line failures: test_launcher_errors.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from build.repository import build
from launcher.server import TritonServer, free_port


def test_serve_command_is_ready_then_stops_cleanly_on_sigterm(tiny, tmp_path):
    build(tiny, tmp_path)
    ports = [str(free_port()) for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.server", "--out", str(tmp_path), "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "ready:" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
        assert "ready:" in line and f"127.0.0.1:{ports[0]}" in line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with pytest.raises(ConnectionRefusedError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", int(ports[0])), timeout=5)
    finally:
        process.kill()


def test_model_load_failure_shows_the_models_error_without_a_log_file(tiny, tmp_path):
    build(tiny, tmp_path)
    config = tmp_path / "model_repository" / "llm" / "config.pbtxt"
    # a setting only the model refuses (a missing checkpoint is caught before tritonserver starts)
    text = config.read_text()
    assert 'key: "llm_weights" value: { string_value: "float32" }' in text
    config.write_text(text.replace('key: "llm_weights" value: { string_value: "float32" }', 'key: "llm_weights" value: { string_value: "no-such-precision" }'))
    server = TritonServer(tmp_path, free_port(), free_port(), free_port())  # no log_file: OUT/tritonserver.log
    with pytest.raises(RuntimeError, match=r"(?s)llm failed to load.*failed to load 'llm'.*no-such-precision"):
        server.start(timeout=180)
    assert (tmp_path / "tritonserver.log").is_file()
