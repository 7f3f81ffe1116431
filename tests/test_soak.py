"""client.soak: the soak loop against fake targets (counts, error classes, percentiles, time limit,
concurrency, report files), the memory sampler on a growing and on a steady process, on two processes
sharing memory (RSS counts it twice, PSS once, USS never) and on /dev/shm regions, and one soak of a
real tritonserver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from client import soak
from client.memory_sampler import FIELDS, MIB, RssSampler, rss_summary

FAKE_KINDS = ("bad a", "bad b", "accepted by mistake")
CONFIG = {"requests": 60, "target": "fake", "url": "nowhere"}


def _reply(job: soak.Job):
    """A fake valid request: the first piece after a short wait, the second after another."""
    time.sleep(0.002 * (job.index % 5))
    yield "a"
    time.sleep(0.002 * (job.index % 3) + 0.001)
    yield "b"


def _refuse(job: soak.Job):
    if job.kind == "accepted by mistake":
        return iter(["some reply"])
    raise ValueError(f"refused {job.kind}: request id 1234567 deadbeefcafe")


def test_counts_error_classes_percentiles_and_report_files(tmp_path):
    plan = soak.make_plan(60, 0.25, 0.5, seed=1, invalid_kinds=FAKE_KINDS)
    assert [j.index for j in plan] == list(range(60)) and sum(not j.valid for j in plan) == 15
    assert {j.kind for j in plan if not j.valid} == set(FAKE_KINDS) and {j.kind for j in plan if j.valid} == set(soak.VALID_KINDS)
    assert 10 < sum(j.stream for j in plan) < 50
    broken = next(j.index for j in plan if j.valid)

    def valid(job):
        if job.index == broken:
            raise RuntimeError("boom")
        return _reply(job)

    outcomes, wall = soak.run_soak(plan, valid, _refuse, concurrency=4, time_limit=60)
    report = soak.summarize(CONFIG, outcomes, wall, [], 0.0, 5.0)

    counts = report["counts"]
    assert report["issued"] == 60 and report["not_issued"] == 0
    assert counts["valid_ok"] == 44 and counts["valid_failed"] == {"count": 1, "messages": {"RuntimeError: boom": 1}}
    assert counts["invalid_refused"] == {"ValueError: refused bad a: request id N N": 5, "ValueError: refused bad b: request id N N": 5}
    assert counts["unexpected_success"] == {"count": 5, "kinds": {"accepted by mistake": 5}}
    assert report["invalid_by_kind"]["bad a"] == {"sent": 5, "unexpected_success": 0, "refused": {"ValueError: refused bad a: request id N N": 5}}

    ok = [o for o in outcomes if o.job.valid and o.error is None]
    latencies = [o.end - o.start for o in ok]
    ttfts = [o.first - o.start for o in ok if o.job.stream]
    for name, values in (("total", latencies), ("time_to_first_token", ttfts)):
        got = report["latency_s"][name]
        assert got["count"] == len(values) > 0
        assert [got["p50"], got["p90"], got["p99"]] == pytest.approx(np.percentile(values, [50, 90, 99]).tolist())
        assert got["max"] == max(values)
    assert all(0 < o.first - o.start < o.end - o.start for o in ok)
    assert report["throughput"]["requests_per_s"] == pytest.approx(60 / wall)
    assert report["memory"]["total"]["rss_bounded"] is None and report["memory"]["processes"] == {}

    text = soak.summary_text(report)
    assert "44 ok, 1 failed" in text and "FAILED ×1: RuntimeError: boom" in text and "ACCEPTED ×5: accepted by mistake" in text

    soak.write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "soak.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "out" / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_limit_stops_issuing_requests():
    plan = soak.make_plan(1000, 0.0, 0.0, seed=0, invalid_kinds=FAKE_KINDS)

    def slow(job):
        time.sleep(0.05)
        return ["x"]

    outcomes, wall = soak.run_soak(plan, slow, _refuse, concurrency=2, time_limit=0.3)
    assert 6 <= len(outcomes) <= 16  # ≈ 2 threads × 0.3 s / 0.05 s
    assert max(o.start for o in outcomes) < 0.3 and wall < 0.3 + 0.05 + 0.5
    report = soak.summarize({**CONFIG, "requests": 1000}, outcomes, wall, [], 0.0, 5.0)
    assert report["not_issued"] == 1000 - len(outcomes)


@pytest.mark.parametrize("concurrency", [1, 5])
def test_concurrency_is_reached_and_never_exceeded(concurrency):
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def tracked(job):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return ["x"]

    plan = soak.make_plan(40, 0.0, 0.0, seed=0, invalid_kinds=FAKE_KINDS)
    outcomes, _ = soak.run_soak(plan, tracked, _refuse, concurrency=concurrency, time_limit=60)
    assert len(outcomes) == 40 and peak[0] == concurrency


# A parent process whose child grows (or holds) memory: the sampler must count children.
PARENT = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"
GROWING = """
import time
chunks = []
print("ready", flush=True)
for _ in range(40):  # 160 MiB in 2 s, every page written
    chunks.append(b"x" * (4 << 20))
    time.sleep(0.05)
print("done", flush=True)
time.sleep(60)
"""
SPIKY = """
import time
chunk = b"x" * (64 << 20)
print("ready", flush=True)
for _ in range(8):  # a 128 MiB request buffer comes and goes; what is held stays 64 MiB
    buffer = bytearray(128 << 20)
    buffer[:: 4096] = b"y" * len(buffer[:: 4096])
    time.sleep(0.1)
    del buffer
    time.sleep(0.3)  # longer than a tenth of the run: every floor window sees the buffer gone
print("done", flush=True)
time.sleep(60)
"""
STEADY = """
import time
chunk = b"x" * (64 << 20)
print("ready", flush=True)
time.sleep(1.5)
print("done", flush=True)
time.sleep(60)
"""


def _sample(script: str, prefixes: set[str] = frozenset(), interval: float = 0.05) -> tuple[RssSampler, list[int]]:
    """Runs PARENT with `script`; samples from its "ready" to its "done" -> (the sampler, pids of PARENT and its child)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        sampler = RssSampler([parent.pid], interval=interval)
        sampler._prefixes |= prefixes  # as a tracked tritonserver's shm-region-prefix-name would set
        sampler.start()
        assert parent.stdout.readline().strip() == "done"
        sampler.stop()
        return sampler, [parent.pid] + [c.pid for c in psutil.Process(parent.pid).children()]
    finally:
        for process in [*psutil.Process(parent.pid).children(recursive=True), parent]:
            process.kill()
        parent.wait()


@pytest.mark.parametrize(("script", "bounded"), [(GROWING, False), (STEADY, True), (SPIKY, True)])
def test_rss_sampler_follows_a_child_process(script, bounded):
    sampler, (parent, child) = _sample(script)
    samples = sampler.samples
    assert len(samples) >= 10 and samples == sorted(samples, key=lambda s: s[0]) and all(len(s) == 4 for s in samples)
    python = os.path.basename(psutil.Process().name())
    assert set(sampler.processes) == {f"{python}[{parent}]", f"{python}[{child}]"}
    assert all(len(v) == len(samples) for v in sampler.processes.values())
    summary = rss_summary(samples, 5.0, "uss")
    for field in FIELDS:  # the child's written pages are its own: RSS, USS and PSS all see them
        got = summary[field]
        assert got["start_mib"] > 64 if script is not GROWING else got["start_mib"] > 5
        if script is STEADY:
            assert abs(got["floor_slope_mib_per_min"]) < 5 and got["end_mib"] == pytest.approx(got["start_mib"], abs=2)
        elif script is SPIKY:  # the raw curve swings by the buffer; its floor stays flat
            assert got["max_mib"] - got["start_mib"] > 100 and abs(got["floor_slope_mib_per_min"]) < 5
        else:  # 80 MiB/s is 4800 MiB/min
            assert got["floor_slope_mib_per_min"] > 1000 and got["end_mib"] - got["start_mib"] > 100
            assert got["floor_change_mib"] > 30
    assert summary["rss_bounded"] is summary["uss"]["rss_bounded"] is bounded
    assert summary["slope_mib_per_min"] == summary["uss"]["floor_slope_mib_per_min"]
    child_uss = rss_summary(sampler.processes[f"{python}[{child}]"], 5.0, "uss")
    assert child_uss["rss_bounded"] is bounded and child_uss["samples"][0][0] == samples[0][0]


# Two processes map the same 64 MiB /dev/shm file and read every page, as tritonserver and a stub do.
SHARED = """
import mmap, os, time
with open({path!r}, "r+b") as f:
    shared = mmap.mmap(f.fileno(), 64 << 20)
read, write = os.pipe()
child = os.fork()
sum(shared[i] for i in range(0, 64 << 20, 4096))  # every page resident in this process
if child == 0:
    os.write(write, b"1")
    time.sleep(60)
    os._exit(0)
os.read(read, 1)
print("ready", flush=True)
time.sleep(0.5)
print("done", flush=True)
time.sleep(60)
"""


def test_shared_pages_count_twice_in_rss_once_in_pss_never_in_uss():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    prefix = f"soaktest_{os.getpid()}_"
    path = Path("/dev/shm") / f"{prefix}region"
    path.write_bytes(bytes(64 << 20))
    try:
        sampler, _ = _sample(SHARED.format(path=str(path)), {prefix})
    finally:
        path.unlink()
    assert len(sampler.processes) == 3  # PARENT, the script, its fork
    rss, uss, pss = (np.mean([s[i] for s in sampler.samples]) / 2**20 for i in (1, 2, 3))
    assert 64 <= rss - pss < 64 + 30  # 64 MiB in two processes: RSS counts it twice, PSS once (and shared libraries)
    assert 64 <= pss - uss < 64 + 20  # ...USS never
    assert all(b == 64 << 20 for _, b in sampler.shm) and len(sampler.shm) == len(sampler.samples)


def test_shm_bytes_are_the_pages_a_region_holds_not_its_size():
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    prefix = f"soaktest_{os.getpid()}_"
    sparse, written = Path("/dev/shm") / f"{prefix}sparse", Path("/dev/shm") / f"{prefix}written"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)  # python_backend sizes regions like this before it touches them
    written.write_bytes(bytes(8 << 20))
    try:
        sampler = RssSampler([])
        sampler._prefixes.add(prefix)
        sampler.sample()
    finally:
        sparse.unlink(), written.unlink()
    assert sampler.shm[-1][1] == 8 << 20


class _Samples:  # what summarize reads of a stopped RssSampler
    def __init__(self, uss_mib, shm_mib):
        self.samples = [(t * 6.0, 0, u * MIB, 0) for t, u in enumerate(uss_mib)]
        self.processes, self.shm = {}, [(t * 6.0, b * MIB) for t, b in enumerate(shm_mib)]


@pytest.mark.parametrize(("shm", "bounded"), [([100] * 40, True), ([100 + 10 * t for t in range(40)], False)])
def test_verdict_needs_the_shm_bytes_bounded_too(shm, bounded):
    report = soak.summarize(CONFIG, [], 1.0, _Samples([500] * 40, shm), 0.0, 5.0)  # 4 minutes, USS flat
    assert report["memory"]["total"]["uss"]["rss_bounded"] is True
    assert report["memory"]["total"]["rss_bounded"] is bounded


def test_soak_of_a_live_tritonserver(server, tmp_path):
    """Every valid request served, every invalid one refused (no class of bad input accepted)."""
    code = soak.main([
        "--url", server.grpc_url, "--requests", "40", "--warmup", "4", "--concurrency", "4", "--invalid-fraction", "0.25", "--max-tokens", "4",
        "--pid", str(server.process.pid), "--rss-interval", "0.2", "--time-limit", "120", "--out", str(tmp_path),
    ])  # fmt: skip
    report = json.loads((tmp_path / "soak.json").read_text())
    counts = report["counts"]
    assert report["issued"] == 40 and counts["valid_ok"] == 30
    assert report["warmup"] == {"issued": 4, "valid_failed": {"count": 0, "messages": {}}}  # sent first, counted apart
    assert counts["valid_failed"]["count"] == 0 and code == 0, counts["valid_failed"]
    assert counts["unexpected_success"]["count"] == 0, counts["unexpected_success"]
    assert report["latency_s"]["total"]["count"] == 30
    memory = report["memory"]
    assert memory["bounded_by"] == "uss" and memory["total"]["rss"]["start_mib"] > 100
    assert memory["total"]["pss"]["start_mib"] <= memory["total"]["rss"]["start_mib"]  # shared pages once, not once per process
    models = {label.split("[")[0] for label in memory["processes"]}
    assert {"tritonserver", "preprocess", "vision_encoder", "llm", "postprocess"} <= models, models
    assert memory["shm"]["start_mib"] > 0  # the stubs' regions, named with the server's prefix
    assert (tmp_path / "soak.png").stat().st_size > 0


@pytest.mark.parametrize(
    "target, url, expected",
    [
        ("openai", "127.0.0.1:{port}", "error: no server answers at http://127.0.0.1:{port}; start the OpenAI server with `make serve` (port 9000)"),
        ("openai", "http://127.0.0.1:{port}", "error: no server answers at http://127.0.0.1:{port}; start the OpenAI server with `make serve` (port 9000)"),
        ("triton", "127.0.0.1:{port}", "error: no Triton gRPC server answers at 127.0.0.1:{port} ("),
    ],
)
def test_nothing_listening_is_one_line_before_the_soak(target, url, expected, tmp_path, capsys):
    from launcher.server import free_port

    port = free_port()
    code = soak.main(["--target", target, "--url", url.format(port=port), "--requests", "4", "--out", str(tmp_path / "soak")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(expected.format(port=port)) and err.count("\n") == 1, err
    assert not (tmp_path / "soak").exists()  # no report of a soak that never ran


def test_memory_is_tracked_only_for_the_server_the_soak_targets():
    """No process listens on the port: no PIDs (formerly: every tritonserver on the machine, test runs included)."""
    from client.memory_sampler import default_pids
    from launcher.server import free_port

    assert default_pids("triton", f"127.0.0.1:{free_port()}") == []
