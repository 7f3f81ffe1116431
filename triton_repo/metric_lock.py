"""Custom-metric updates from several threads of one python model, one at a time.

python_backend's stub-side Metric is not thread-safe: every increment / set re-saves the metric into
the shared-memory pool, replacing (and so freeing) the block its previous call handed to tritonserver
(python_backend src/metric.cc: SendIncrementRequest -> SaveToSharedMemory). Two threads updating one
metric let tritonserver read a freed block: a 600-request soak crashed it with SIGSEGV in
triton::core::Metric::Increment, called from ModelInstanceState::ProcessMetricRequest (gdb backtrace,
Triton 2.51). The llm model updates its gauges from its execute thread and its engine loop's thread.
Importable without Triton (no pb_utils here).
"""

from __future__ import annotations

import threading


class MetricLock:
    def __init__(self):
        self._lock = threading.Lock()

    def increment(self, metric, value: float) -> None:
        # metric: a pb_utils Metric (or anything with increment)
        with self._lock:
            metric.increment(value)
