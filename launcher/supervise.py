"""The GPU server command (tritonserver, or mpirun over its ranks) as a child process with the
OpenAI-compatible server beside it: what `make serve TARGET=gpu` runs when --openai-port is set.
The OpenAI server starts once Triton reports ready and stops before Triton does; SIGINT, SIGTERM or
SIGHUP stop both (tritonserver lets in-flight requests finish for its exit timeout; mpirun passes
SIGTERM on to its ranks)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

from launcher.openai_process import OpenAIProcess, die_with_parent

READY_TIMEOUT = 3600.0  # s: large engines take minutes to load
STOP_TIMEOUT = 60.0  # s after SIGTERM before the server's process group is killed


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def serve_with_openai(command: list[str], env: dict[str, str], http_port: int, openai: OpenAIProcess) -> int:
    """Runs until a stop signal or the server's exit; -> the exit status (0 when stopped by a signal)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    server = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(http_port):
            if stop.wait(0.5) or server.poll() is not None:
                return server.returncode or 0
            if time.monotonic() > deadline:
                print(f"error: Triton was not ready within {READY_TIMEOUT:.0f} s", flush=True)
                return 1
        try:
            openai.start()
        except RuntimeError as error:
            print(f"error: {error}", flush=True)
            return 1
        print(f"ready: Triton HTTP :{http_port}  OpenAI {openai.url}/v1  (Ctrl-C stops)", flush=True)
        while not stop.wait(0.5) and server.poll() is None:
            pass
        return 0 if stop.is_set() else server.returncode
    finally:
        openai.stop()
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
