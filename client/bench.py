"""Serving benchmark: latency and throughput of the `internvl` ensemble under load.

    python -m client.bench --url 127.0.0.1:8001                       # a running server (gRPC)
    python -m client.bench --out artifacts/build                      # starts tritonserver from a build
    python -m client.bench --out artifacts/build --request-rate 0.5 1 2 --num-requests 40

Per level (a concurrency, or a Poisson request rate), N requests after `--warmup` excluded ones;
every request streams (one response per generated token) with a fixed output length
(`min_tokens` = `max_tokens`, so the stop token cannot end it early). Metric names follow
`vllm bench serve` (mean/median/p90/p99 of ttft, tpot, itl, e2el in ms; output_throughput in
tokens/s; request_throughput) plus image_throughput. Writes bench.json, bench.csv, latency.png
and throughput.png into --results.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from client.synthetic import synthetic_image
from client.triton_client import InternVLClient

WORDS = "image picture colour light shadow object person animal street window table river house tree sky".split()
PERCENTILES = {"mean": None, "median": 50, "p90": 90, "p99": 99}


@dataclass
class Sample:
    question: str
    images: list[bytes]


@dataclass
class Outcome:
    sent: float
    times: list[float] = field(default_factory=list)  # arrival of each streamed response (= token)
    images: int = 0
    error: str | None = None


def make_samples(args, count: int, rng: random.Random) -> list[Sample]:
    pool = [p.read_bytes() for p in sorted(Path(args.image_dir).iterdir()) if p.is_file()] if args.image_dir else []
    pool = pool or [synthetic_image(i, width, height, "JPEG") for i, (width, height) in enumerate(args.image_size)]
    samples = []
    for _ in range(count):
        words = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words))
        images = [rng.choice(pool) for _ in range(args.images_per_request)]
        tags = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(images))) if len(images) > 1 else ""
        samples.append(Sample(f"{tags}Describe it: {words}", images))
    return samples


def run_one(client: InternVLClient, sample: Sample, args, sent: float) -> Outcome:
    outcome = Outcome(sent=sent, images=len(sample.images))
    try:
        kwargs = dict(max_tokens=args.output_tokens, min_tokens=args.output_tokens, max_tiles=args.max_tiles)
        for _ in client.stream(sample.question, sample.images, keep_empty=True, **kwargs):
            outcome.times.append(time.perf_counter())
    except Exception as error:  # noqa: BLE001 — counted as a failed request
        outcome.error = str(error)
    return outcome


def run_level(client, samples: list[Sample], args, concurrency: int | None, rate: float | None, label: str) -> tuple[list[Outcome], float]:
    """The measured outcomes and their wall time in seconds; the warm-up requests are in neither
    (as vLLM's bench serve and AIPerf, whose throughputs divide by the measured window only)."""
    warmup, measured = samples[: args.warmup], samples[args.warmup :]
    with ThreadPoolExecutor(max(concurrency or 1, 1)) as pool:
        list(pool.map(lambda s: run_one(client, s, args, time.perf_counter()), warmup))
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    progress = tqdm(total=len(measured), desc=label, unit="req", leave=False)

    def job(sample: Sample, send_at: float) -> None:
        delay = send_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        outcome = run_one(client, sample, args, time.perf_counter())
        with lock:
            outcomes.append(outcome)
            progress.update()

    start = time.perf_counter()
    if rate:  # Poisson arrivals at `rate` requests/s
        gaps = np.random.default_rng(args.seed).exponential(1 / rate, len(measured))
        send_times = start + np.cumsum(gaps) - gaps[0]
        with ThreadPoolExecutor(len(measured)) as pool:
            list(pool.map(job, measured, send_times))
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda s: job(s, 0.0), measured))
    duration = time.perf_counter() - start
    progress.close()
    return outcomes, duration


def summarize(outcomes: list[Outcome], duration: float) -> dict:
    done = [o for o in outcomes if o.error is None and o.times]
    ttft = [o.times[0] - o.sent for o in done]
    e2el = [o.times[-1] - o.sent for o in done]
    tpot = [(o.times[-1] - o.times[0]) / (len(o.times) - 1) for o in done if len(o.times) > 1]
    itl = [b - a for o in done for a, b in zip(o.times, o.times[1:])]
    tokens = sum(len(o.times) for o in done)
    result = {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": duration,
        "total_output_tokens": tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": tokens / duration,
        "image_throughput": sum(o.images for o in done) / duration,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        for stat, q in PERCENTILES.items():
            ms = [v * 1000 for v in values]
            result[f"{stat}_{name}_ms"] = (float(np.mean(ms)) if q is None else float(np.percentile(ms, q))) if ms else None
    return result


def plot(levels: list[dict], axis: str, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [level[axis] for level in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in ("median_ttft_ms", "median_tpot_ms", "median_e2el_ms", "p99_e2el_ms"):
        ax.plot(x, [level[metric] for level in levels], marker="o", label=metric)
    ax.set(xlabel=axis, ylabel="ms", title="latency", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results / "latency.png", dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [level["output_throughput"] for level in levels], marker="o", label="output tokens/s")
    ax.set(xlabel=axis, ylabel="tokens/s", title="throughput")
    twin = ax.twinx()
    twin.plot(x, [level["request_throughput"] for level in levels], marker="s", color="tab:orange", label="requests/s")
    twin.set_ylabel("requests/s")
    fig.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(results / "throughput.png", dpi=100)
    plt.close("all")


def size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.bench", description=__doc__.split("\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="gRPC address of a running server")
    target.add_argument("--out", type=Path, help="build directory: start tritonserver from it for the run")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    load.add_argument("--request-rate", type=float, nargs="+", help="Poisson request rates (requests/s) instead")
    p.add_argument("--num-requests", type=int, default=16, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=2, help="requests per level excluded from the metrics")
    p.add_argument("--image-size", type=size, nargs="+", default=[(1280, 720)], help="synthetic image sizes, WxH")
    p.add_argument("--image-dir", type=Path, help="use these image files instead of synthetic ones")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--max-tiles", type=int)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=64, help="fixed output length (stop token ignored)")
    p.add_argument("--results", type=Path, default=Path("artifacts/bench"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    server = None
    if args.out:
        from launcher.server import TritonServer, free_port

        server = TritonServer(args.out, free_port(), free_port(), free_port(), log_file=args.results / "tritonserver.log")
        server.start()
    try:
        client = InternVLClient(server.grpc_url if server else args.url)
        axis, values = ("request_rate", args.request_rate) if args.request_rate else ("concurrency", args.concurrency)
        rng = random.Random(args.seed)
        levels = []
        for value in values:
            samples = make_samples(args, args.warmup + args.num_requests, rng)
            concurrency, rate = (None, value) if axis == "request_rate" else (value, None)
            outcomes, duration = run_level(client, samples, args, concurrency, rate, f"{axis}={value}")
            level = {axis: value, **summarize(outcomes, duration)}
            levels.append(level)
            print(
                f"{axis}={value}: {level['completed']} ok, {level['failed']} failed, "
                f"TTFT p50 {level['median_ttft_ms'] or float('nan'):.0f} ms, "
                f"TPOT p50 {level['median_tpot_ms'] or float('nan'):.1f} ms, "
                f"{level['output_throughput']:.1f} tok/s, {level['request_throughput']:.2f} req/s",
                flush=True,
            )
    finally:
        if server:
            server.stop()
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "levels": levels}
    (args.results / "bench.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    with open(args.results / "bench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in levels[0] if k != "errors"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(levels)
    plot(levels, axis, args.results)
    print(f"results: {args.results}/bench.json, bench.csv, latency.png, throughput.png")
    return report


if __name__ == "__main__":
    main()
