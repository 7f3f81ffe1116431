"""Command line: python -m bench_components [--out DIR] [--quick] [--only pre,vision,vision_runs,llm,weights,guided,triton,cache]
[--reference-python PATH]"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import bench_components
from bench_components.cache import bench_cache
from bench_components.common import HEALTH, PROBE, ROOT, TARGETS, THREADS, cpu_times, log, machine_info, probe_machine
from bench_components.guided import bench_guided
from bench_components.llm import bench_llm
from bench_components.llm_weights import bench_llm_weights
from bench_components.preprocess import bench_preprocess
from bench_components.report import print_table, table_rows
from bench_components.triton import bench_triton
from bench_components.vision import bench_vision
from bench_components.vision_runs import bench_vision_runs

# --only's name -> (key of its results in components.json, runner), in the order they run
SECTIONS = {
    "pre": ("preprocess", bench_preprocess),
    "vision": ("vision", bench_vision),
    "vision_runs": ("vision_runs", bench_vision_runs),
    "llm": ("llm", bench_llm),
    "weights": ("weights", bench_llm_weights),
    "guided": ("guided", bench_guided),
    "triton": ("triton", bench_triton),
    "cache": ("cache", bench_cache),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench_components", description=bench_components.__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench", help="results + cached artifacts (default artifacts/bench)")
    parser.add_argument("--quick", action="store_true", help="small repetition counts: a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections (default: all)")
    parser.add_argument(
        "--reference-python", help="section pre: an interpreter with torch 2.14.1 + torchvision 0.29.1 + Pillow 13 for the cards' load_image (default: OUT/seed-venv, made on first use)"
    )
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    import torch

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    cpu_start = cpu_times()
    results = {"command": " ".join([Path(sys.executable).name, "-m", "bench_components", *sys.argv[1:]]), "quick": args.quick}
    results["machine"] = machine_info()
    log(f"machine: {results['machine']['cpu']}, {THREADS} cpus, {results['machine']['mem_gb']} GB, SIMD {results['machine']['simd']}")
    results["probe_start"] = probe_machine("start")
    PROBE.update(results["probe_start"])
    HEALTH.wait_budget_s = 20.0 if args.quick else 90.0
    HEALTH.probe("start")
    for section in sections:
        key, runner = SECTIONS[section]
        section_start = time.perf_counter()
        log(f"== {key}")
        results[key] = runner(out, args.quick, args.reference_python) if section == "pre" else runner(out, args.quick)
        results[key]["section_s"] = time.perf_counter() - section_start
        gc.collect()
    results["probe_end"] = probe_machine("end")
    cpu_end = cpu_times()
    if cpu_start and cpu_end:
        total = sum(cpu_end[k] - cpu_start[k] for k in ("busy", "idle", "steal")) or 1
        results["cpu_steal_pct"] = 100 * (cpu_end["steal"] - cpu_start["steal"]) / total
    results["health"] = {
        "rule": "a round is healthy when the probes before and after it saw >= 1.6 effective cores, >= 80% of the best sgemm rate and >= 65% of the best read bandwidth",
        "waited_s": HEALTH.waited_s,
        "probes": len(HEALTH.log),
        "unhealthy_probes": [p for p in HEALTH.log if not p["healthy"]],
        "log": HEALTH.log,
    }
    results["runtime_s"] = time.perf_counter() - started
    results["targets"] = TARGETS
    results["table"] = table_rows(results)
    (out / "components.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print_table(results["table"])
    steal = results.get("cpu_steal_pct")
    print(
        f"\nthreads: {THREADS} (torch intra-op, ORT intra-op, preprocess pool); reference preprocessing: the cards' load_image in its own interpreter, torch at the same threads.\n"
        f"machine: effective cores {results['probe_start']['effective_cores']} (start) / {results['probe_end']['effective_cores']} (end)"
        + (f", CPU steal {steal:.1f}% of the run" if steal is not None else "")
        + f"\nhealth probes: {results['health']['probes']}, throttled: {len(results['health']['unhealthy_probes'])}"
        + (f" (first at {results['health']['unhealthy_probes'][0]['t']} s: {results['health']['unhealthy_probes'][0]['label']})" if results["health"]["unhealthy_probes"] else "")
        + f", waited {results['health']['waited_s']:.0f} s for the VM"
        + f"\ntotal runtime {results['runtime_s']:.0f} s; results: {out / 'components.json'}"
    )


if __name__ == "__main__":
    main()
