"""Start the real `tritonserver` (from the nvidia-pytriton wheel) on a generated model repository.

    python -m launcher.server --out artifacts/build [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

On CPU machines the wheel's server has only the python backend; the NGC
`tritonserver:<yy.mm>-trtllm-python-py3` container loads the same repository layout. Two things
make the wheel's python backend work from a virtualenv: a backend directory holding the stub built
for this interpreter's Python version, and LD_LIBRARY_PATH pointing at this interpreter's libpython
(the stub has no rpath and would otherwise load the OS's libpython against our stdlib).

Stopping: tritonserver runs in its own session, so a terminal's Ctrl-C reaches only the launcher,
which stops the server at any moment (also while the models load): SIGINT (Triton lets in-flight
requests finish, then unloads; --exit-timeout + STOP_GRACE seconds for both), then SIGKILL to whatever is left of its
process group (the python backend stubs ignore SIGINT and SIGTERM: python_backend src/pb_stub.cc,
SignalHandler), then removal of the stubs' shared-memory regions, which carry a prefix of this
server's own.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from build.settings import HelpFormatter
from launcher.openai_process import OpenAIProcess
from openai_api.settings import API_KEY_ENV
from triton_repo import allocator

SHARED_MEMORY = Path("/dev/shm")
EXIT_TIMEOUT = 3  # s in-flight requests get on stop
STOP_GRACE = 5.0  # s beyond that for unloading the models (~4 s on 2 cores) before the process group is killed
# tritonserver's own --exit-timeout-secs covers in-flight requests and unloading together, and when it
# expires it logs an error and exits without unloading: it is set past the launcher's deadline, so an
# idle stop always unloads cleanly and a busy one ends by the launcher's SIGKILL at that deadline
TRITON_EXIT_MARGIN = 2


class LaunchError(RuntimeError):
    """What keeps the server from serving, said so that the user can act on it.
    status 2: the command cannot work as given (nothing was started); 1: the server failed."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """request_stop() came while the models were loading; the server is stopped."""


@functools.cache
def wheel() -> Path:
    """The tritonserver distribution in the nvidia-pytriton wheel. Imported on first use: the GPU
    launcher imports this module's port check inside a container that has no pytriton."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(address: str, port: int) -> bool:
    """Whether a server could not bind (address, port) now. SO_REUSEADDR as servers set it, so a
    port in TIME_WAIT counts as free; a listening socket (also one with SO_REUSEPORT) does not."""
    family, kind, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError:
            return True
    return False


PORT_FLAGS = {"--http-port": "HTTP_PORT", "--grpc-port": "GRPC_PORT", "--metrics-port": "METRICS_PORT", "--openai-port": "OPENAI_PORT"}


def check_ports(address: str, ports: dict[str, int]) -> None:
    """ports: flag -> port. LaunchError (status 2) naming the first port taken twice or already in use."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port in seen:
            raise LaunchError(f"{seen[port]} and {flag} are both {port}: give each its own port", status=2)
        seen[port] = flag
        if port_in_use(address, port):
            raise LaunchError(
                f"port {port} ({flag}) is already in use on {address}: stop what listens there or choose another "
                f"port ({flag} N, or make serve {PORT_FLAGS.get(flag, flag)}=N)",
                status=2,
            )


def build_record(out: Path) -> dict:
    """OUT/build.json, what `make build` wrote it from ({"target", "values": the configs' values}); {} without one."""
    build_file = Path(out) / "build.json"
    return json.loads(build_file.read_text(encoding="utf-8")) if build_file.is_file() else {}


def check_repository(out: Path) -> None:
    if not any((Path(out) / "model_repository").glob("*/config.pbtxt")):
        raise LaunchError(f"no model repository in {out}: run `make build OUT={out}` first", status=2)
    # the models load the checkpoint the build was made from: gone, each would fail at length (twice)
    checkpoint = build_record(out).get("values", {}).get("checkpoint")
    if checkpoint and not (Path(checkpoint) / "config.json").is_file():
        raise LaunchError(
            f"the build in {out} was made from the checkpoint {checkpoint}, which is not there any more "
            f"(moved or deleted after `make build`?): put it back, or rebuild with `make build MODEL=<its path> OUT={out}`",
            status=2,
        )


def backend_directory(out: Path) -> Path:
    """OUT/backends/python = the wheel's python backend + the stub for this Python."""
    python_dir = out / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": wheel() / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel() / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": wheel() / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, source in sources.items():
        if not source.is_file():
            raise FileNotFoundError(f"{source} missing: is nvidia-pytriton installed for Python {version}?")
        target = python_dir / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)  # a link, not a copy: the stub finds its libraries relative to itself
    return python_dir.parent


def process_group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


class TritonServer:
    """A tritonserver subprocess; a context manager that waits for readiness and stops it.

    Its output (with the python backend stubs') always goes to log_file (default
    <repository>/tritonserver.log), and with echo=True to stderr as well. When stop() returns, no
    process of the server and none of its shared-memory regions is left."""

    def __init__(
        self,
        repository: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        log_file: Path | None = None,
        echo: bool = False,
        exit_timeout: int = EXIT_TIMEOUT,
    ):
        self.repository = Path(repository)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.address = address
        self.log_file = Path(log_file) if log_file else self.repository / "tritonserver.log"
        self.echo, self.exit_timeout = echo, exit_timeout
        # The python backend names a stub's region <prefix><uuid> in /dev/shm (python_backend
        # src/stub_launcher.cc; the prefix defaults to triton_python_backend_shm_region_ for every
        # server, src/python_be.cc): a prefix of our own lets stop() remove exactly our leftovers.
        self.shm_prefix = f"internvl_{os.getpid()}_{secrets.token_hex(4)}_"
        self.process: subprocess.Popen | None = None
        self._log_copier: threading.Thread | None = None
        self._stop_requested = self._kill_now = False

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.address}:{self.metrics_port}"

    def command(self) -> list[str]:
        return [
            str(wheel() / "bin" / "tritonserver"),
            f"--model-repository={self.repository / 'model_repository'}",
            f"--backend-directory={backend_directory(self.repository)}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout + int(STOP_GRACE) + TRITON_EXIT_MARGIN}",
            "--log-verbose=0",
        ]

    def environment(self) -> dict[str, str]:
        env = server_environment()
        libdirs = (sysconfig.get_config_var("LIBDIR"), str(wheel().parent.parent / "nvidia_pytriton.libs"))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (*libdirs, env.get("LD_LIBRARY_PATH")) if p)
        # The stub imports with this interpreter's path: the venv's packages (and this project: server_environment).
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self, timeout: float = 300.0) -> TritonServer:
        """Checks the repository and the ports, starts tritonserver and waits until every model is
        ready. LaunchError when it cannot serve, Interrupted after request_stop()."""
        check_repository(self.repository)
        check_ports(self.address, {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port})
        command, env = self.command(), self.environment()
        log = open(self.log_file, "wb")
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: no terminal signal, one killpg for the stubs
        )
        atexit.register(self.stop)
        self._log_copier = threading.Thread(target=self._copy_log, args=(self.process.stdout, log), daemon=True)
        self._log_copier.start()
        try:
            self._wait_until_ready(timeout)
        except BaseException:  # also KeyboardInterrupt: nothing of a failed start outlives it
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self._stop_requested:
                self.stop()
                raise Interrupted("stopped while the models were loading")
            if not self.running():
                self.stop()  # first: the log is complete after it
                raise LaunchError(self._failure(f"tritonserver exited with code {self.process.returncode} before it was ready"))
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(self._failure(f"tritonserver not ready after {timeout:.0f} s"))
            time.sleep(0.25)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def running(self) -> bool:
        if self.process is None or self.process.returncode is not None:
            return False
        # WNOWAIT: an exited tritonserver stays unreaped, so its pid keeps naming its process group
        # (no other process can take it) until stop() has killed the rest of the group.
        return os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None

    def request_stop(self) -> None:
        """For signal handlers (sets flags only): start() or serve_until_stopped() then stops the
        server; a second request skips the graceful part of stop()."""
        self._kill_now = self._stop_requested
        self._stop_requested = True

    def serve_until_stopped(self) -> None:
        """Returns after request_stop() with the server stopped; LaunchError if tritonserver exits by itself."""
        while not self._stop_requested:
            if not self.running():
                self.stop()
                raise LaunchError(self._failure(f"tritonserver exited with code {self.process.returncode}"))
            time.sleep(0.25)
        self.stop()

    def stop(self) -> None:
        """Graceful for at most exit_timeout + STOP_GRACE seconds, then SIGKILL to the process group;
        then the shared memory. Idempotent; also right after a failed or interrupted start."""
        if self.process is None or self.process.returncode is not None:
            return
        if self.running():
            os.kill(self.process.pid, signal.SIGINT)  # not send_signal(): it would reap the process
            deadline = time.monotonic() + self.exit_timeout + STOP_GRACE
            while self.running() and time.monotonic() < deadline and not self._kill_now:
                time.sleep(0.1)
        self._kill_process_group()
        self.process.wait()
        for region in SHARED_MEMORY.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self._log_copier:
            self._log_copier.join(timeout=5)
        atexit.unregister(self.stop)

    def _kill_process_group(self) -> None:
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return  # tritonserver and all its stubs are gone
        deadline = time.monotonic() + 5
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _copy_log(self, pipe, log) -> None:
        """Until tritonserver and its stubs close their output. Never stops reading early: a full
        pipe would block the server."""
        echo = self.echo
        with pipe, log:
            for line in iter(pipe.readline, b""):
                log.write(line)
                log.flush()
                try:
                    if echo:
                        sys.stderr.write(line.decode("utf-8", errors="replace"))
                        sys.stderr.flush()
                except (OSError, ValueError):  # the terminal went away (SIGHUP); the log file goes on
                    echo = False

    def _failure(self, what: str, lines: int = 30) -> str:
        """`what`, then the models' load errors (they say why a model is UNAVAILABLE), else the end of the log."""
        log = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines() if self.log_file.is_file() else []
        errors = [line for line in log if "failed to load" in line or "Failed to initialize" in line]
        shown = "\n".join(line.replace("\\n", "\n") for line in errors or log[-lines:])
        failed = sorted(set(re.findall(r"failed to load '([^']+)'", "\n".join(errors))))
        cause = f"{', '.join(failed) or 'a model'} failed to load, see below" if errors else "the end of its log"
        return f"{what}; {cause} (full log: {self.log_file}):\n{shown}"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_environment() -> dict[str, str]:
    """tritonserver's environment on both targets: this process's, without the OpenAI front's API key
    (tritonserver and its python stubs have no use for it; the OpenAI child inherits it from this
    process), with this project on PYTHONPATH for the stubs and the allocator settings."""
    env = {name: value for name, value in os.environ.items() if name != API_KEY_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    return {**env, **allocator.server_environment()}


def refuse_gpu_build(out: Path) -> None:
    if build_record(out).get("target") == "gpu":
        raise LaunchError(f"{out} holds a GPU build: serve it inside the TensorRT-LLM container with `make serve TARGET=gpu OUT={out}`", status=2)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m launcher.server", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="build directory (make build OUT=...)")
    parser.add_argument("--address", default="127.0.0.1", help="address the HTTP and gRPC endpoints listen on")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP endpoint (KServe v2, generate)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC endpoint (KServe v2, streaming)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics")
    parser.add_argument(
        "--exit-timeout", type=int, default=EXIT_TIMEOUT,
        help=f"seconds in-flight requests get to finish on Ctrl-C / SIGTERM, before {STOP_GRACE:.0f} s more for unloading the models",
    )  # fmt: skip
    parser.add_argument("--openai-port", type=int, default=0, help="also serve the OpenAI-compatible API (python -m openai_api) on this port; 0 = no")
    args = parser.parse_args()
    server = TritonServer(args.out, args.http_port, args.grpc_port, args.metrics_port, args.address, echo=True, exit_timeout=args.exit_timeout)
    openai = OpenAIProcess(server.grpc_url, args.address, args.openai_port) if args.openai_port else None
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: server.request_stop())
    try:
        refuse_gpu_build(args.out)
        if openai:
            check_ports(args.address, {"--openai-port": args.openai_port})
        server.start()
        if openai:
            openai.start()
        api = f"  OpenAI {openai.url}/v1" if openai else ""
        print(f"ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {args.address}:{args.metrics_port}{api}  (Ctrl-C stops)", flush=True)
        server.serve_until_stopped()
    except Interrupted as stopped:
        parser.exit(0, f"{stopped}\n")
    except (LaunchError, RuntimeError) as error:
        parser.exit(getattr(error, "status", 1), f"error: {error}\n")
    finally:
        if openai:
            openai.stop()
        server.stop()
    print("stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
