"""Stopping the server at any moment leaves no process and no shared memory behind.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the tests start the
launcher in a group of its own and signal that group, as the terminal would."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from build.repository import build
from client.triton_client import InternVLClient
from launcher.server import TritonServer, free_port, port_in_use

SHM = Path("/dev/shm")


def _processes_naming(out: Path) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes whose command line names `out`:
    the launcher, tritonserver and its python backend stubs."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if re.search(re.escape(str(out)) + r"(/|\s|$)", command) and state != "Z":
            found[int(entry.name)] = command
    return found


def _stubs(out: Path) -> dict[int, str]:
    return {pid: cmd for pid, cmd in _processes_naming(out).items() if "triton_python_backend_stub" in cmd}


def _mapped_shm(pids) -> set[str]:
    """Names of the /dev/shm regions these processes have mapped (every stub's region is mapped by
    the stub and by tritonserver)."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        regions |= {line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)") for line in maps.splitlines() if "/dev/shm/" in line}
    return regions


def _assert_nothing_left(out: Path, regions: set[str], prefix: str) -> None:
    deadline = time.monotonic() + 5  # SIGKILLed processes take a moment to go
    while _processes_naming(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_naming(out), f"left running: {_processes_naming(out)}"
    assert not [r for r in regions if (SHM / r).exists()], "shared memory left behind"
    assert not list(SHM.glob(f"{prefix}*")), "shared memory left behind"


def _launch(out: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    """The launcher as `make serve` runs it, in a process group of its own; output into files."""
    ports = {flag: free_port() for flag in ("--http-port", "--grpc-port", "--metrics-port", "--openai-port")}
    command = [sys.executable, "-m", "launcher.server", "--out", str(out)]
    for flag, port in ports.items():
        command += [flag, str(port)]
    with open(out / "launcher.out", "wb") as stdout, open(out / "launcher.err", "wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True)
    return process, ports


def _ready(out: Path) -> bool:
    return "ready:" in (out / "launcher.out").read_text()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _ctrl_c(process: subprocess.Popen, out: Path) -> tuple[float, str]:
    """SIGINT to the launcher's process group; -> (seconds until the launcher exited, its stderr)."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    return time.monotonic() - started, (out / "launcher.err").read_text()


def _stream_in_background(grpc_url: str) -> list[str]:
    """Streams a long reply on a daemon thread; -> the list its deltas are appended to."""
    deltas: list[str] = []

    def run():
        try:
            for delta in InternVLClient(grpc_url).stream("Tell me a very long story.", keep_empty=True, max_tokens=2000, min_tokens=2000):
                deltas.append(delta)
        except Exception:
            pass  # the server went away mid-stream: that is the point

    threading.Thread(target=run, daemon=True).start()
    _wait(lambda: len(deltas) >= 5, 60, "the stream to start")
    return deltas


def _assert_stopped_cleanly(launcher, stderr: str, seconds: float, last_line: str, build_dir, regions) -> None:
    assert launcher.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == last_line
    assert seconds < 15
    _assert_nothing_left(build_dir, regions, f"internvl_{launcher.pid}_")


def test_ctrl_c_while_loading_leaves_no_orphan_stub_or_shm(tiny, tmp_path):
    build(tiny, tmp_path)
    launcher, _ = _launch(tmp_path)
    try:
        _wait(lambda: any("/llm/1/model.py" in cmd for cmd in _stubs(tmp_path).values()) or launcher.poll() is not None, 180, "the llm stub")
        assert not _ready(tmp_path), "ready before the test could interrupt the loading"
        regions = _mapped_shm(_processes_naming(tmp_path))
        assert regions
        seconds, stderr = _ctrl_c(launcher, tmp_path)
    finally:
        launcher.kill()
    _assert_stopped_cleanly(launcher, stderr, seconds, "stopped while the models were loading", tmp_path, regions)


def test_ctrl_c_while_streaming_stops_promptly_and_leaves_no_orphan_stub_or_shm(tiny, tmp_path):
    build(tiny, tmp_path)
    launcher, ports = _launch(tmp_path)
    try:
        _wait(lambda: _ready(tmp_path) or launcher.poll() is not None, 180, "ready")
        assert launcher.poll() is None, (tmp_path / "launcher.err").read_text()
        deltas = _stream_in_background(f"127.0.0.1:{ports['--grpc-port']}")
        openai = f"http://127.0.0.1:{ports['--openai-port']}"
        assert f"OpenAI {openai}/v1" in (tmp_path / "launcher.out").read_text()
        models = json.loads(urllib.request.urlopen(f"{openai}/v1/models", timeout=10).read())
        assert [m["id"] for m in models["data"]] == [tiny.name]
        regions = _mapped_shm(_processes_naming(tmp_path))
        assert regions
        seconds, stderr = _ctrl_c(launcher, tmp_path)
    finally:
        launcher.kill()
    # within 15 s: --exit-timeout (3 s) for the in-flight stream, then the process group is killed
    _assert_stopped_cleanly(launcher, stderr, seconds, "stopped", tmp_path, regions)
    assert len(deltas) < 2000
    assert not port_in_use("127.0.0.1", ports["--openai-port"]), "the OpenAI API server outlived the launcher"


def test_server_context_manager_under_load_leaves_no_orphan_stub_or_shm(tiny, tmp_path):
    build(tiny, tmp_path)
    with TritonServer(tmp_path, free_port(), free_port(), free_port()) as server:
        deltas = _stream_in_background(server.grpc_url)
        regions = _mapped_shm(_processes_naming(tmp_path))
        assert _stubs(tmp_path) and regions
        started = time.monotonic()
    assert time.monotonic() - started < 15
    assert len(deltas) < 2000
    assert (tmp_path / "tritonserver.log").is_file()  # the default log file
    _assert_nothing_left(tmp_path, regions, server.shm_prefix)


def test_an_idle_stop_unloads_every_model_and_logs_no_error(tiny, tmp_path):
    """tritonserver's exit timeout covers in-flight requests and unloading; at 3 s it expired while
    idle models were still unloading, and every stop logged `failed to stop server: ... Exit timeout
    expired` (an E line docs/SERVING.md does not explain)."""
    build(tiny, tmp_path)
    with TritonServer(tmp_path, free_port(), free_port(), free_port()) as server:
        assert InternVLClient(server.grpc_url).chat("Hi", max_tokens=2)
    log = (tmp_path / "tritonserver.log").read_text(encoding="utf-8", errors="replace")
    assert "Exit timeout expired" not in log and "failed to stop server" not in log
    for model in ("internvl", "preprocess", "vision_encoder", "llm", "postprocess"):
        assert f"successfully unloaded '{model}'" in log, model
