"""Memory of a served model over a soak: sampling the server's processes, and the bounded-ness verdict.

Every --rss-interval s (client/soak.py), RSS, USS and PSS of each tracked process and its children, and the
bytes the server's /dev/shm regions hold (tmpfs pages allocated). Summed RSS counts a shared page
(libraries; the shm regions tritonserver and every stub map) once per process, summed PSS once, summed
USS never; python_backend maps a region again each time it grows and keeps the old mappings
(src/shm_manager.cc GrowIfNeeded), which inflates RSS and PSS but not memory. So the server's memory
is summed USS plus the shm bytes. The first half of the samples is warm-up (allocator pools, ONNX
Runtime's arena growing to the largest batch, shm regions to the largest tensor); a leak keeps growing
after it. Requests' transient buffers make the curve swing by hundreds of MiB, so the verdict reads
its floor (the least held within a tenth of the run around each sample): `rss_bounded` is true when
the least-squares slope of the floor over the second half is below --rss-slope-limit MiB/min for
summed --bounded-by (USS) and for the shm bytes (null with < 3 samples there), and is given for each
process too. A short run exaggerates a one-off step (1 MiB in 10 s is 6 MiB/min; a new largest
batch): soak for minutes before trusting a false.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil

MIB = 2**20
FIELDS = ("rss", "uss", "pss")


class RssSampler:
    """Samples on a thread (time.monotonic(), RSS, USS, PSS in bytes): `samples` summed over the processes
    and all their children, `processes` each one's by _label; `shm` (time, bytes of the /dev/shm files
    named with a tracked tritonserver's python backend prefix)."""

    def __init__(self, pids: Iterable[int], interval: float = 0.5):
        self.pids, self.interval, self.samples, self.shm, self.processes, self._labels, self._prefixes = list(pids), interval, [], [], {}, {}, set()
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        processes: dict[int, psutil.Process] = {}
        for pid in self.pids:
            with suppress(psutil.Error):  # gone, or not ours to inspect
                process = psutil.Process(pid)
                processes.update({pid: process, **{child.pid: child for child in process.children(recursive=True)}})
        now, memory = time.monotonic(), {}
        for process in processes.values():
            with suppress(psutil.Error):
                m = process.memory_full_info()  # USS, PSS: /proc/<pid>/smaps_rollup
                memory[self._label(process)] = (m.rss, m.uss, m.pss)
                self.processes.setdefault(self._label(process), []).append((now, m.rss, m.uss, m.pss))
        self.samples.append((now, *(sum(m[i] for m in memory.values()) for i in range(len(FIELDS)))))
        with suppress(OSError):  # no /dev/shm (macOS), or a file went meanwhile
            self.shm.append((now, sum(e.stat().st_blocks * 512 for e in os.scandir("/dev/shm") if self._prefixes and e.name.startswith(tuple(self._prefixes)))))

    def _label(self, process: psutil.Process) -> str:  # name[pid]: a stub by its model directory, `python -m X` by X
        if process.pid not in self._labels:
            cmd, name = process.cmdline(), process.name()
            if len(cmd) > 1 and cmd[0].endswith("triton_python_backend_stub"):
                name = Path(cmd[1]).parent.parent.name  # <repository>/<model>/<version>/model.py
            elif "-m" in cmd[:-1]:
                name = cmd[cmd.index("-m") + 1]
            if name == "tritonserver":  # its option, else python_be.cc's default
                self._prefixes.add(next((a.split("=")[-1] for a in cmd if "shm-region-prefix-name=" in a), "triton_python_backend_shm_region_"))
            self._labels[process.pid] = f"{name}[{process.pid}]"
        return self._labels[process.pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval if self.samples else 0):
            self.sample()

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int, int, int]]:
        self._stop.set(), self._thread.join(), self.sample()
        return self.samples


def default_pids(target: str, url: str) -> list[int]:
    """The process listening on the URL's port, and the one on its --triton-url's (the OpenAI server's);
    none when no process here listens there (or sockets cannot be seen): never other servers, which
    (test runs, other deployments) come and go and would count."""
    listening: dict[int, int] = {}
    with suppress(psutil.AccessDenied):  # unprivileged on some systems (macOS)
        listening = {c.laddr.port: c.pid for c in psutil.net_connections("tcp") if c.pid and c.status == psutil.CONN_LISTEN}
    port = lambda u: urlparse(u if "//" in u else "//" + u).port or 80  # noqa: E731
    pids = {listening[port(url)]} if port(url) in listening else set()
    with suppress(psutil.Error, ValueError, IndexError, KeyError, StopIteration):  # none, or no --triton-url
        cmd = psutil.Process(next(iter(pids))).cmdline()
        pids.add(listening[port(cmd[cmd.index("--triton-url") + 1])])
    return sorted(pids)


def memory_floor(minutes: np.ndarray, mib: np.ndarray, window: float) -> np.ndarray:
    """The least memory held within ±window/2 minutes of each sample: a request's transient buffers
    (the vision encoder's activations come and go with each batch) drop out, what stays does not."""
    lo, hi = np.searchsorted(minutes, minutes - window / 2), np.searchsorted(minutes, minutes + window / 2, side="right")
    return np.array([mib[a:b].min() for a, b in zip(lo, hi)])


def rss_summary(samples: list[tuple], slope_limit: float, bounded_by: str | None = None, t0: float = 0.0) -> dict:
    """(time, bytes) samples -> start, max and end in MiB; least-squares slopes (MiB/min) over the
    second half of the samples and of their floor (memory_floor over a tenth of the run), the change
    the floor's fitted line makes across it; rss_bounded by the module's rule.
    (time, RSS, USS, PSS) samples and bounded_by -> that for each, bounded_by's verdict, the samples."""
    if bounded_by:
        by = {f: rss_summary([(s[0], s[1 + i]) for s in samples], slope_limit) for i, f in enumerate(FIELDS)}
        return {"rss_bounded": by[bounded_by]["rss_bounded"], "slope_mib_per_min": by[bounded_by]["floor_slope_mib_per_min"], **by, "samples": [[t - t0, *m] for t, *m in samples]}
    minutes, mib = np.array(samples, dtype=float).reshape(-1, 2).T / [[60], [MIB]]
    half = len(samples) // 2
    fits = len(samples) - half >= 3 and minutes[-1] > minutes[half]
    floor = memory_floor(minutes, mib, (minutes[-1] - minutes[0]) / 10) if fits else None
    slope, floor_slope = (float(np.polyfit(minutes[half:], y[half:], 1)[0]) if fits else None for y in (mib, floor))
    ends = {"start_mib": float(mib[0]), "max_mib": float(mib.max()), "end_mib": float(mib[-1])} if samples else dict.fromkeys(("start_mib", "max_mib", "end_mib"))
    return {
        **ends, "last_half_slope_mib_per_min": slope, "floor_slope_mib_per_min": floor_slope,
        "floor_change_mib": None if floor_slope is None else floor_slope * float(minutes[-1] - minutes[half]),
        "rss_bounded": None if floor_slope is None else floor_slope < slope_limit,
    }
