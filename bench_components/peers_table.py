"""The whole-request comparison's tables (docs/PERFORMANCE.md): per precision, a row per image size and
concurrency both servers ran (from peers_requests.json's medians); AIPerf against our make bench
client on our server, pair by pair; and where our server's time went in each run."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench_components.peers_aiperf import read_metrics

SIDES = ("ours", "llama-server")


def _key_order(key: str) -> tuple[int, int]:
    size, concurrency = key.rsplit("-c", 1)
    width, height = (int(v) for v in size.split("x"))
    return width * height, int(concurrency)


def _as_c1(name: str) -> str:
    """A make bench run's folder name -> the AIPerf concurrency-1 run's of its size (it ran at 1)."""
    return name.replace("-make-bench", "-c1")


def _pair(cells: list[dict], metric: str, stat: str, scale: float, digits: int) -> str:
    return " / ".join(f"{cell[metric][stat] * scale:.{digits}f}" for cell in cells)


def table(medians: dict) -> str:
    """medians: {precision: {server: {"WxH-cN": {metric: {stat: value}, "rounds": n}}}} -> markdown."""
    lines = []
    for precision, servers in medians.items():
        keys = sorted(set.intersection(*(set(servers.get(s, {})) for s in SIDES)), key=_key_order)
        if not keys:
            continue
        lines += [
            f"{precision} (ours / llama-server):",
            "",
            "| image | concurrency | rounds | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | output tok/s | requests/s | TTFT p50 ratio | tok/s ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key in keys:
            cells = [servers[s][key] for s in SIDES]
            size, concurrency = key.rsplit("-c", 1)
            ttft = cells[0]["time_to_first_token"]["p50"] / cells[1]["time_to_first_token"]["p50"]
            rate = cells[0]["output_token_throughput"]["avg"] / cells[1]["output_token_throughput"]["avg"]
            lines.append(
                f"| {size.replace('x', '×')} | {concurrency} | {'/'.join(str(c.get('rounds', 1)) for c in cells)} "
                f"| {_pair(cells, 'time_to_first_token', 'p50', 1e-3, 2)} | {_pair(cells, 'time_to_first_token', 'p99', 1e-3, 2)} "
                f"| {_pair(cells, 'inter_token_latency', 'p50', 1, 0)} | {_pair(cells, 'inter_token_latency', 'p99', 1, 0)} "
                f"| {_pair(cells, 'output_token_throughput', 'avg', 1, 3)} | {_pair(cells, 'request_throughput', 'avg', 1, 4)} "
                f"| {ttft:.2f}x | {rate:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def agreement(out: Path) -> str:
    """AIPerf's numbers for our server at concurrency 1 against our `make bench` client's, per
    precision, round and image size where both ran, with when each finished (UTC): the machine's
    speed drifts over hours, so only pairs of one server session (minutes apart) compare the tools."""
    lines = [
        "| precision | round | image | finished: make bench / AIPerf | TTFT p50 s | ITL p50 ms | output tok/s | make bench − AIPerf (TTFT, ITL, tok/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def order(path: Path) -> tuple:
        return path.parts[-5], path.parts[-3], _key_order(_as_c1(path.parent.name))

    pairs: dict[tuple[str, str], list[tuple[tuple, tuple]]] = {}
    for bench_file in sorted(out.glob("*/ours/round*/*-make-bench/bench.json"), key=order):
        run = bench_file.parent.with_name(_as_c1(bench_file.parent.name))
        export = run / "profile_export_aiperf.json"
        if not export.is_file():
            continue
        level, metrics = json.loads(bench_file.read_text(encoding="utf-8"))["levels"][0], read_metrics(export)
        ours = (level["median_ttft_ms"] / 1e3, level["median_itl_ms"], level["output_throughput"])
        theirs = (metrics["time_to_first_token"]["p50"] / 1e3, metrics["inter_token_latency"]["p50"], metrics["output_token_throughput"]["avg"])
        when = " / ".join(time.strftime("%H:%M", time.gmtime(p.stat().st_mtime)) for p in (bench_file, export))
        precision, round_name, size = bench_file.parts[-5], bench_file.parts[-3], run.name.removesuffix("-c1")
        pairs.setdefault((precision, size), []).append((ours, theirs))
        lines.append(_agreement_row(precision, round_name.removeprefix("round"), size, when, ours, theirs))
    for (precision, size), found in pairs.items():
        if len(found) > 1:  # the rounds alternate which tool goes first: their medians cancel the order
            ours, theirs = (tuple(statistics.median(v) for v in zip(*side)) for side in zip(*found))
            lines.append(_agreement_row(precision, f"median of {len(found)}", size, "", ours, theirs))
    return "\n".join(lines) + "\n"


def _agreement_row(precision: str, rounds: str, size: str, when: str, ours: tuple, theirs: tuple) -> str:
    """ours / theirs: (TTFT p50 s, ITL p50 ms, output tok/s) of make bench / AIPerf."""
    diffs = ", ".join(f"{(a - b) / b:+.1%}" for a, b in zip(ours, theirs))
    return (
        f"| {precision} | {rounds} | {size.replace('x', '×')} | {when} | {ours[0]:.2f} / {theirs[0]:.2f} "
        f"| {ours[1]:.0f} / {theirs[1]:.0f} | {ours[2]:.3f} / {theirs[2]:.3f} | {diffs} |"
    )


def _client_cpu(spent: dict) -> str:
    return f"{spent['client_cpu_s']:.1f}" if "client_cpu_s" in spent else "—"  # counted from 2026-12-08 on


def time_spent(out: Path) -> str:
    """Where our server's time went in each AIPerf run and make bench run (its triton_metrics.json:
    Triton's counters over the run, warm-up included). Vision and the LLM engine run side by side on
    the same cores, so their busy seconds may add up to more than the window; an LLM step slowed by
    vision shows as ITL. Client CPU: the load generator's own CPU seconds over the run, taken from the
    same cores."""
    lines = [
        "| precision | round | image | concurrency | window s | vision encoder s (share) | tiles | LLM prefill s | LLM decode s | sequences per step | client CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def order(path: Path) -> tuple:
        return path.parts[-5], path.parts[-3], _key_order(_as_c1(path.parent.name)), path.parent.name.endswith("-c1")

    for path in sorted(out.glob("*/ours/round*/*/triton_metrics.json"), key=order):
        spent = json.loads(path.read_text(encoding="utf-8"))
        steps = {int(b): n for b, n in spent["llm_steps_by_batch_size"].items()}
        per_step = sum(b * n for b, n in steps.items()) / max(sum(steps.values()), 1)
        size, concurrency = _as_c1(path.parent.name).rsplit("-c", 1)
        concurrency += " (make bench)" if path.parent.name.endswith("-make-bench") else ""
        lines.append(
            f"| {path.parts[-5]} | {path.parts[-3].removeprefix('round')} | {size.replace('x', '×')} | {concurrency} | {spent['window_s']:.1f} "
            f"| {spent['vision_encoder_s']:.1f} ({spent['vision_encoder_s'] / spent['window_s']:.0%}) | {spent['vision_tiles']} "
            f"| {spent['llm_prefill_s']:.1f} | {spent['llm_decode_s']:.1f} | {per_step:.2f} | {_client_cpu(spent)} |"
        )
    return "\n".join(lines) + "\n"
