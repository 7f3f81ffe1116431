"""The llm model's metric updates never overlap (python_backend's stub-side Metric is not thread-safe:
overlapping updates crashed tritonserver in a soak; triton_repo/metric_lock.py)."""

import ast
import threading
import time
from pathlib import Path

from triton_repo.metric_lock import MetricLock

ROOT = Path(__file__).resolve().parents[1]


class RaceDetectingMetric:
    """Like SendIncrementRequest, holds its state across a blocking call: a second caller inside it is a race."""

    def __init__(self):
        self.inside, self.overlaps, self.value = 0, 0, 0.0

    def increment(self, value):
        self.inside += 1
        self.overlaps += self.inside > 1
        time.sleep(0.001)  # the stub waits for tritonserver with the GIL released
        self.value += value
        self.inside -= 1


def _hammer(update) -> None:
    threads = [threading.Thread(target=lambda sign=sign: [update(sign) for _ in range(40)]) for sign in (1, -1, 1, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_unlocked_updates_from_threads_overlap():  # the detector sees the race the lock prevents
    metric = RaceDetectingMetric()
    _hammer(metric.increment)
    assert metric.overlaps > 0


def test_locked_updates_never_overlap_and_lose_nothing():
    metric, lock = RaceDetectingMetric(), MetricLock()
    _hammer(lambda v: lock.increment(metric, v))
    assert metric.overlaps == 0 and metric.value == 40 * (1 - 1 + 1 + 1)


def test_every_metric_update_of_the_llm_model_goes_through_the_lock():
    tree = ast.parse((ROOT / "triton_repo/llm/1/model.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("increment", "set")]
    owners = {ast.unparse(c.func.value) for c in calls}
    assert calls and owners == {"self.metrics"}, owners
