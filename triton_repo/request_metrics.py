"""The llm step's request metrics, the same on both targets (the CPU engine's model and the GPU
wrapper over tensorrt_llm): internvl_llm_requests_in_flight and internvl_llm_aborted_total.
Importable only inside Triton's python stub."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from triton_repo.metric_lock import MetricLock


class RequestMetrics:
    def __init__(self, lock: MetricLock):
        self.lock = lock  # every metric of the model instance updates under one lock
        self.families = [  # must outlive their metrics
            pb_utils.MetricFamily(
                name="internvl_llm_aborted_total",
                description="requests ended because their client cancelled or went away",
                kind=pb_utils.MetricFamily.COUNTER,
            ),
            pb_utils.MetricFamily(
                name="internvl_llm_requests_in_flight",
                description="requests holding an engine slot (waiting or running, KV cache allocated or pending)",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
        ]
        self.aborted, self.in_flight = (family.Metric() for family in self.families)

    def started(self) -> None:
        self.lock.increment(self.in_flight, 1)

    def failed_to_start(self) -> None:
        self.lock.increment(self.in_flight, -1)

    def finished(self, aborted: bool) -> None:
        self.lock.increment(self.in_flight, -1)
        if aborted:
            self.lock.increment(self.aborted, 1)
