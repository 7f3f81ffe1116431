"""Triton's Prometheus metrics (the metrics port's /metrics), read as {(name, labels): value}, and what
a stretch of serving added to them: benchmarks use it to say where a run's time went (Triton's per-model
nv_inference_compute_infer_duration_us, our internvl_llm_step_duration_us{phase}), tests to check them."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name without "_total", sorted label pairs)


def parse(text: str) -> dict[Key, float]:
    # the parser names every counter sample <name>_total, Triton's own counters have no such suffix
    return {
        (sample.name.removesuffix("_total"), tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def read(metrics_url: str, timeout: float = 10.0) -> dict[Key, float]:
    """metrics_url: host:port of Triton's metrics endpoint (as its --metrics-port serves it)."""
    url = metrics_url if "://" in metrics_url else f"http://{metrics_url}"
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
        return parse(response.read().decode())


def added(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    """What happened between two readings of the same server (counters; a gauge's change)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(readings: dict[Key, float], name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels` (e.g. model="vision_encoder")."""
    name, wanted = name.removesuffix("_total"), set(labels.items())
    return sum(value for (sample, pairs), value in readings.items() if sample == name and wanted <= set(pairs))


def by_label(readings: dict[Key, float], name: str, label: str) -> dict[str, float]:
    """`name`'s samples keyed by one label's value, e.g. internvl_llm_steps_total by batch_size."""
    name, out = name.removesuffix("_total"), {}
    for (sample, pairs), value in readings.items():
        labels = dict(pairs)
        if sample == name and label in labels:
            out[labels[label]] = out.get(labels[label], 0.0) + value
    return out
