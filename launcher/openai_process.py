"""The OpenAI-compatible server as a child process next to tritonserver (`make serve`): started once
Triton is ready, stopped (SIGTERM, then SIGKILL) before Triton is, and sent SIGTERM by the kernel when
its launcher dies without stopping it (SIGKILL)."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT = 10.0  # seconds after SIGTERM (the server gives open requests 5 s: openai_api/server.py)


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the launcher dies, also by SIGKILL (which it cannot
    handle), so no server is left running without its supervisor (Linux prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class OpenAIProcess:
    def __init__(self, triton_url: str, host: str, port: int):
        self.url = f"http://{host}:{port}"
        self.command = [sys.executable, "-m", "openai_api", "--triton-url", triton_url, "--host", host, "--port", str(port)]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> OpenAIProcess:
        self.process = subprocess.Popen(self.command, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI API server exited with status {self.process.returncode}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"the OpenAI API server did not answer at {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
