"""Shared by every section: paths, thread count, targets, the run log, timing (interleaved races gated by
VM health probes) and the machine probes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CKPT_1B = ROOT / "artifacts" / "checkpoints" / "internvl3_5-1b"
CKPT_TINY = ROOT / "artifacts" / "checkpoints" / "tiny-qwen3"
SAMPLE_IMAGE = ROOT / "client" / "samples" / "lake_house.jpg"
THREADS = os.cpu_count() or 1

TARGETS = {
    "pre_single": 1.3,  # ours / the cards' load_image in its real stack, one 1920x1080 JPEG, max_num=12
    "pre_batch": 2.0,  # ours load_images (all cores) / the cards' load_image loop, 32 mixed images
    "vision": 1.5,  # ORT / torch eager tiles/s
    "llm_floor": 0.80,  # decode ms/token floor / measured
    "llm_hf": 1.2,  # ours / transformers decode tokens/s
    "llm_8x": 4.0,  # 8-stream aggregate / 1-stream tokens/s
    "ttft": 0.10,  # Triton TTFT overhead over in-process
    "cache_warm": 0.10,  # second-turn TTFT with the vision-feature cache and prefix reuse / without
    "guided": 0.05,  # decode step time with a JSON-schema guide / without, minus 1
}

_T0 = time.perf_counter()
PROBE: dict = {}  # the start-of-run machine probe (sgemm peak), for roofline percentages


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", flush=True)


# ----------------------------------------------------------------------------- timing helpers


class Health:
    """In-run check of the VM: it sometimes gives this guest less than its 2 cores for minutes, which
    the start/end probes and the steal counter do not show. A 0.15 s probe (1024³ sgemm at 1 and at
    THREADS threads, and a THREADS-thread read of 256 MB) runs before every timed round and after the
    last one; a round is healthy when both probes around it saw >= 1.6 effective cores, >= 80% of the
    best sgemm rate and >= 65% of the best read bandwidth seen so far.
    Before a round, an unhealthy machine is waited for (bounded by a budget for the whole run).
    Medians are taken over healthy rounds (over all rounds, flagged, when none was healthy)."""

    def __init__(self):
        self.best = 0.0
        self.best_bw = 0.0
        self._mem = None
        self.log: list[dict] = []
        self.wait_budget_s = 0.0
        self.waited_s = 0.0
        self._a = self._b = None

    def probe(self, label: str = "") -> bool:
        import torch

        if self._a is None:
            self._a, self._b = torch.randn(1024, 1024), torch.randn(1024, 1024)
            self._mem = torch.ones(64 * 1024 * 1024)  # 256 MB
        before = torch.get_num_threads()
        rates = {}
        for threads in (1, THREADS):
            torch.set_num_threads(threads)
            self._a @ self._b
            rates[threads] = 2 * 1024**3 / min(timeit(lambda: self._a @ self._b) for _ in range(3)) / 1e9
        bw = self._mem.numel() * 4 / min(timeit(self._mem.sum) for _ in range(3)) / 1e9
        torch.set_num_threads(before)
        self.best = max(self.best, rates[THREADS])
        self.best_bw = max(self.best_bw, bw)
        cores = rates[THREADS] / rates[1]
        healthy = (cores >= 1.6 or THREADS < 2) and rates[THREADS] >= 0.8 * self.best and bw >= 0.65 * self.best_bw
        self.log.append(
            {
                "t": round(time.perf_counter() - _T0, 1),
                "label": label,
                "effective_cores": round(cores, 2),
                "gflops": round(rates[THREADS], 1),
                "read_gb_s": round(bw, 1),
                "healthy": healthy,
            }
        )
        return healthy

    def gate(self, label: str = "") -> bool:
        """Probe; while unhealthy and budget remains, wait and re-probe. -> healthy now."""
        healthy = self.probe(label)
        if not healthy:
            last = self.log[-1]
            log(f"health: machine throttled before '{label}' ({last['effective_cores']} effective cores, {last['gflops']:.0f} GFLOP/s, {last['read_gb_s']:.0f} GB/s); waiting")
        while not healthy and self.waited_s < self.wait_budget_s:
            time.sleep(3)
            self.waited_s += 3 + 0.1
            healthy = self.probe(label + " (waited)")
        return healthy


HEALTH = Health()


def summary(times: list[float], healthy: list[bool] | None = None) -> dict:
    healthy = healthy if healthy is not None else [True] * len(times)
    good = [t for t, h in zip(times, healthy) if h]
    use = good or times
    return {
        "median_s": statistics.median(use),
        "min_s": min(use),
        "runs_s": [round(t, 6) for t in times],
        "healthy": healthy,
        "throttled_runs_excluded": len(times) - len(good) if good else 0,
        "all_runs_throttled": not good,
    }


def race(candidates: dict, reps: int, warmup: int = 1, label: str = "") -> dict[str, dict]:
    """Times each callable `reps` times after `warmup` untimed calls, interleaved (order alternates per
    round); every round is bracketed by health probes."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times = {name: [] for name in names}
    healthy_before = HEALTH.gate(label)
    healthy = []
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
        healthy_after = HEALTH.probe(label)
        healthy.append(healthy_before and healthy_after)
        healthy_before = healthy_after if healthy_after or rep == reps - 1 else HEALTH.gate(label)
    return {name: summary(t, healthy) for name, t in times.items()}


def cpu_times() -> dict[str, int]:
    # /proc/stat first line: user nice system idle iowait irq softirq steal ... (clock ticks)
    try:
        fields = open("/proc/stat").readline().split()[1:]
    except OSError:
        return {}
    values = [int(v) for v in fields]
    return {"busy": sum(values[:3]) + sum(values[4:7]), "idle": values[3], "steal": values[7] if len(values) > 7 else 0}


# ----------------------------------------------------------------------------- machine probe


def probe_machine(label: str) -> dict:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3
    before = torch.get_num_threads()
    gflops = {}
    for threads in (1, 2, 1, 2):  # twice each, interleaved: the VM's share can change within seconds
        torch.set_num_threads(threads)
        for _ in range(2):
            a @ b
        best = min(timeit(lambda: a @ b) for _ in range(5))
        gflops[threads] = max(gflops.get(threads, 0.0), flops / best / 1e9)
    torch.set_num_threads(before)
    scaling = gflops[2] / gflops[1]
    out = {
        "label": label,
        "sgemm_gflops_1_thread": round(gflops[1], 1),
        "sgemm_gflops_2_threads": round(gflops[2], 1),
        "effective_cores": round(scaling, 2),
        "loadavg": os.getloadavg(),
    }
    log(
        f"probe ({label}): sgemm 2048³ fp32 1 thread {gflops[1]:.0f} GFLOP/s, 2 threads {gflops[2]:.0f} GFLOP/s "
        f"-> {scaling:.2f} effective cores; loadavg {out['loadavg'][0]:.2f}"
    )
    return out


def timeit(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_info() -> dict:
    import onnxruntime
    import PIL
    import torch
    import transformers

    model = "?"
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0
    try:
        mem = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "simd": sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "f16c"))),
        "mem_gb": round(mem / 1e9, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def memory_bandwidth(gigabytes: float, threads: int, reps: int = 5) -> float:
    """Read bandwidth, GB/s: best of `reps` torch .sum() over a float32 tensor of `gigabytes`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.ones(int(gigabytes * 1e9 / 4))
    x.sum()
    best = min(timeit(x.sum) for _ in range(reps))
    torch.set_num_threads(before)
    nbytes = x.numel() * 4
    del x
    return nbytes / best / 1e9
