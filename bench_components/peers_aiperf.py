"""NVIDIA AIPerf (the successor of genai-perf) as the load generator of the whole-request comparison, in
a venv of its own: its pins (pillow 12, rich 14, huggingface_hub < 2, ...) conflict with ours. The venv
is made once under the cache from bench_components/aiperf_requirements.txt (aiperf 0.13.0 and every
package it resolved to, pinned).

A run (aiperf 0.13.0, config/flags/cli_config.py): the chat endpoint, streaming; one line of a
single_turn input file with the prompt text and an image path (AIPerf sends it as a data: URI);
--osl fixes max_completion_tokens, and the stop token is kept from ending a reply early with
`min_tokens` (ours, vLLM's extra) and `ignore_eos` (llama-server's), each server ignoring the other's;
greedy on both (temperature 0: llama-server samples at 0.8 by default, ours is greedy);
token counts from the servers' `usage` (--use-server-token-count), with the checkpoint's own tokenizer
directory for what AIPerf still loads (no hub here; HF_HUB_OFFLINE would make it refuse a local path).
Warm-up requests are AIPerf's own, kept out of its summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_components.common import ROOT, log

REQUIREMENTS = ROOT / "bench_components" / "aiperf_requirements.txt"
# profile_export_aiperf.json: metric -> statistic reported (TTFT / ITL in ms, throughputs per second)
METRICS = {
    "time_to_first_token": ("p50", "p99"),
    "inter_token_latency": ("p50", "p99"),
    "output_token_throughput": ("avg",),
    "request_throughput": ("avg",),
    "request_latency": ("p50",),
    "input_sequence_length": ("avg",),
    "output_sequence_length": ("avg",),
}


def ensure_aiperf(cache: Path) -> Path:
    """-> the aiperf executable of the pinned venv under cache, made if missing."""
    venv = cache / "aiperf-venv"
    binary = venv / "bin" / "aiperf"
    stamp = venv / "requirements.txt"
    if binary.is_file() and stamp.is_file() and stamp.read_text() == REQUIREMENTS.read_text():
        return binary
    log(f"peers: installing AIPerf into {venv} (once; ~1 min, ~1.2 GB)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(REQUIREMENTS.read_text())
    return binary


def aiperf_command(
    aiperf: Path, url: str, model: str, tokenizer: Path, input_file: Path, output_tokens: int,
    concurrency: int, requests: int, warmup: int, out_dir: Path, system_prompt: Path | None = None,
) -> list[str]:  # fmt: skip
    system = [] if system_prompt is None else ["--system-prompt-file", str(system_prompt.resolve())]
    return [
        str(aiperf), "profile", *system, "--url", url, "--endpoint-type", "chat", "--model", model, "--streaming",
        "--tokenizer", str(tokenizer.resolve()), "--use-server-token-count",
        "--input-file", str(input_file.resolve()), "--custom-dataset-type", "single_turn",
        "--osl", str(output_tokens), "--osl-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{output_tokens}", "--extra-inputs", "temperature:0",
        "--concurrency", str(concurrency), "--request-count", str(requests), "--warmup-request-count", str(warmup),
        # concurrency alone is AIPerf's burst mode, whose timing_manager retries a full slot without
        # pause: one core at 100% (py-spy: RequestRateStrategy.execute_phase -> try_issue_credit), half
        # of this machine taken from the server under test (TTFT 13.0 s vs 6.9 s in its own warm-up).
        # A constant 20 attempts/s under the concurrency cap keeps every slot filled within 50 ms, idle
        "--request-rate", "20", "--arrival-pattern", "constant",
        "--random-seed", "0", "--artifact-dir", str(out_dir.resolve()), "--ui", "none",
        "--no-server-metrics", "--no-gpu-telemetry",
    ]  # fmt: skip


def write_input(path: Path, prompt: str, images: list[Path]) -> Path:
    """AIPerf's single_turn JSONL: a line per image, sent in order (so no image repeats while there
    are lines left)."""
    lines = [json.dumps({"text": prompt, "image": str(image.resolve())}) for image in images]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_aiperf(command: list[str], out_dir: Path) -> dict:
    """Runs one profile (skipped when out_dir holds its result: runs resume) -> {metric: {stat: value}}."""
    result = out_dir / "profile_export_aiperf.json"
    if not result.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["AIPERF_DATASET_MMAP_CACHE_ENABLED"] = "false"
        with open(out_dir / "aiperf.stdout.log", "w") as log_file:
            subprocess.run(command, check=True, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return read_metrics(result)


def read_metrics(path: Path) -> dict:
    export = json.loads(path.read_text(encoding="utf-8"))
    return {name: {stat: export[name][stat] for stat in stats} for name, stats in METRICS.items() if name in export}
