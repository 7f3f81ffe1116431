"""Start the real `tritonserver` (from the nvidia-pytriton wheel) on a generated model repository.

    python -m triton_repo.server --out artifacts/build [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

On CPU machines the wheel's server has only the python backend; the NGC
`tritonserver:<yy.mm>-trtllm-python-py3` container loads the same repository layout. Two things
make the wheel's python backend work from a virtualenv: a backend directory holding the stub built
for this interpreter's Python version, and LD_LIBRARY_PATH pointing at this interpreter's libpython
(the stub has no rpath and would otherwise load the OS's libpython against our stdlib).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytriton

WHEEL = Path(pytriton.__file__).parent / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(out: Path) -> Path:
    """OUT/backends/python = the wheel's python backend + the stub for this Python."""
    python_dir = out / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": WHEEL / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": WHEEL / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": WHEEL / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} missing: is nvidia-pytriton installed for Python {version}?")
        target = python_dir / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)  # a link, not a copy: the stub finds its libraries relative to itself
    return python_dir.parent


class TritonServer:
    """A tritonserver subprocess; a context manager that waits for readiness and stops it."""

    def __init__(
        self,
        repository: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        log_file: Path | None = None,
    ):
        self.repository = Path(repository)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(WHEEL / "bin" / "tritonserver"),
            f"--model-repository={self.repository / 'model_repository'}",
            f"--backend-directory={backend_directory(self.repository)}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdirs = (sysconfig.get_config_var("LIBDIR"), str(WHEEL.parent.parent / "nvidia_pytriton.libs"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libdirs, env.get("LD_LIBRARY_PATH")) if p)
        # The stub imports with this interpreter's path: the venv's packages and this project.
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
        return env

    def start(self, timeout: float = 300.0) -> TritonServer:
        log = open(self.log_file, "wb") if self.log_file else None
        self.process = subprocess.Popen(
            self.command(), env=self.environment(), stdout=log or None, stderr=subprocess.STDOUT if log else None
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s{self._log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _log_tail(self, lines: int = 30) -> str:
        """Model load errors first (they say why a model is UNAVAILABLE), then the end of the log."""
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        log = Path(self.log_file).read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [line for line in log if "failed to load" in line or "Failed to initialize" in line]
        shown = errors or log[-lines:]
        return "\n--- tritonserver log ---\n" + "\n".join(line.replace("\\n", "\n") for line in shown)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="build directory (make build OUT=...)")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()
    server = TritonServer(args.out, args.http_port, args.grpc_port, args.metrics_port, args.address)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {args.address}:{args.metrics_port}  (Ctrl-C stops)", flush=True)
    while not stop["now"] and server.process.poll() is None:
        time.sleep(0.5)
    server.stop()
    sys.exit(0 if stop["now"] else server.process.returncode)


if __name__ == "__main__":
    main()
