"""Smoke test of the serving benchmark: every metric present, sane and consistent."""

from __future__ import annotations

import csv
import json

from client import bench

LATENCIES = ("ttft", "tpot", "itl", "e2el")


def test_bench_reports_every_metric_with_sane_values(server, tmp_path):
    bench.main([
        "--url", server.grpc_url, "--concurrency", "1", "2", "--num-requests", "3", "--warmup", "1",
        "--output-tokens", "6", "--image-size", "640x480", "--results", str(tmp_path),
    ])  # fmt: skip
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert (level["completed"], level["failed"]) == (3, 0)
        assert level["total_output_tokens"] == 3 * 6  # fixed output length: the stop token cannot end early
        for name in LATENCIES:
            values = [level[f"{stat}_{name}_ms"] for stat in ("median", "p90", "p99")]
            assert all(v > 0 for v in values) and values == sorted(values), (name, values)
            assert level[f"mean_{name}_ms"] > 0
        assert level["p99_ttft_ms"] <= level["p99_e2el_ms"] and level["median_ttft_ms"] <= level["median_e2el_ms"]
        assert level["mean_tpot_ms"] <= level["mean_e2el_ms"]
        assert abs(level["output_throughput"] - level["total_output_tokens"] / level["duration_s"]) < 1e-9
        assert level["request_throughput"] == level["image_throughput"] > 0  # one image per request
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert len(rows) == 2 and "median_ttft_ms" in rows[0] and "output_throughput" in rows[0]
    assert (tmp_path / "latency.png").stat().st_size > 0 and (tmp_path / "throughput.png").stat().st_size > 0
