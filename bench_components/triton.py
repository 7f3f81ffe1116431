"""Section triton: time to first token through tritonserver (gRPC streaming) vs in-process Pipeline.stream."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import time
from pathlib import Path

from bench_components.common import CKPT_1B, CKPT_TINY, HEALTH, SAMPLE_IMAGE, log, summary
from client.synthetic import synthetic_image


def bench_triton(out: Path, quick: bool) -> dict:
    """Two shapes: the tiny checkpoint with a 9-tile image (the worst case for relative overhead: its
    compute is small next to the fixed cost of the hops) and without one (that fixed cost alone), and
    the internvl3_5-1b shape with one tile."""
    from build.checkpoint import generate

    image = SAMPLE_IMAGE.read_bytes() if SAMPLE_IMAGE.is_file() else synthetic_image(1, 1280, 720, "JPEG")
    generate("tiny", "qwen3", CKPT_TINY)
    results = {"configs": {}}
    tiny_reps = (3, 2) if quick else (10, 3)
    results["configs"]["tiny"] = _ttft_race(CKPT_TINY, out / "triton_tiny", [image], None, *tiny_reps)
    if not quick:
        # no image: the fixed cost of the ensemble's hops alone
        results["configs"]["tiny, text only"] = _ttft_race(CKPT_TINY, out / "triton_tiny", [], None, *tiny_reps)
        generate("internvl3_5-1b", "qwen3", CKPT_1B)
        results["configs"]["internvl3_5-1b"] = _ttft_race(CKPT_1B, out / "triton_1b", [image], 1, 3, 2)
    return results


def _ttft_race(checkpoint: Path, repo: Path, images: list[bytes], max_tiles: int | None, reps: int, warmup: int) -> dict:
    """TTFT of one request (images + question), Triton and in-process interleaved on the same machine."""
    from build.repository import build
    from client.triton_client import InternVLClient
    from engine.pipeline import Pipeline
    from launcher.server import TritonServer, free_port

    log(f"triton: building the repository for {checkpoint.name} into {repo}")
    with contextlib.redirect_stdout(io.StringIO()):
        build(checkpoint, repo)
    question = "Describe the image in detail."
    max_tokens = 8

    def first_token_inprocess(pipe) -> tuple[float, float, float]:
        # -> (time to the first generated token, time to the first non-empty text delta, total)
        marks = {}
        engine_step = pipe.llm.step

        def step():
            events = engine_step()
            if "token" not in marks and any(e.token_id is not None for e in events):
                marks["token"] = time.perf_counter()
            return events

        pipe.llm.step = step  # instance attribute: observes, changes nothing
        try:
            start = time.perf_counter()
            for delta in pipe.stream(question, images=images, max_new_tokens=max_tokens, max_tiles=max_tiles):
                marks.setdefault("delta", time.perf_counter())
            end = time.perf_counter()
        finally:
            del pipe.llm.step
        return marks["token"] - start, marks.get("delta", end) - start, end - start

    def first_token_triton(client) -> tuple[float, float]:
        start, first = time.perf_counter(), None
        for _ in client.stream(question, images, keep_empty=True, max_tokens=max_tokens, max_tiles=max_tiles):
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - start

    log("triton: in-process Pipeline (onnxruntime backend)")
    pipe = Pipeline.from_pretrained(checkpoint, vision_backend="onnxruntime", vision_onnx=repo / "vision_encoder.onnx")
    num_tiles = sum(pipe.prepare(question, images, max_tiles=max_tiles).features.num_tiles)
    ports = [free_port() for _ in range(3)]
    log(f"triton: starting tritonserver (HTTP {ports[0]}, gRPC {ports[1]}, metrics {ports[2]})")
    started = time.perf_counter()
    server = TritonServer(repo, *ports, log_file=repo / "tritonserver.log").start()
    try:
        startup_s = time.perf_counter() - started
        client = InternVLClient(server.grpc_url)
        log(f"triton: ready in {startup_s:.1f} s; {num_tiles} tile(s); TTFT {reps} runs each after {warmup} warm-ups, interleaved")
        for _ in range(warmup):
            first_token_triton(client)
            first_token_inprocess(pipe)
        triton_runs, inproc_runs, oks = [], [], []
        stats_before = _triton_stats(server.http_url)
        ok = HEALTH.gate("triton ttft")
        for rep in range(reps):
            # the in-process pipeline runs while tritonserver idles (its threads block, they do not spin)
            order = (0, 1) if rep % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    triton_runs.append(first_token_triton(client))
                else:
                    inproc_runs.append(first_token_inprocess(pipe))
            after = HEALTH.probe("triton ttft")
            oks.append(ok and after)
            ok = after if after or rep == reps - 1 else HEALTH.gate("triton ttft")
        stage_ms = _stats_delta(stats_before, _triton_stats(server.http_url), reps)
        log("triton: per-model server time per request, ms (queue / input / infer / output): " + "; ".join(
            f"{m} {v['queue']:.1f}/{v['compute_input']:.1f}/{v['compute_infer']:.1f}/{v['compute_output']:.1f}" for m, v in stage_ms.items()
        ))
    finally:
        server.stop()
        del pipe
        gc.collect()
    log("triton: server stopped")
    ttft_triton = summary([r[0] for r in triton_runs], oks)
    ttft_inproc = summary([r[0] for r in inproc_runs], oks)
    overhead = ttft_triton["median_s"] / ttft_inproc["median_s"] - 1
    log(
        f"triton: {checkpoint.name}: TTFT {1e3 * ttft_triton['median_s']:.1f} ms vs in-process {1e3 * ttft_inproc['median_s']:.1f} ms "
        f"-> overhead {100 * overhead:+.1f}%"
    )
    from PIL import Image

    return {
        "checkpoint": str(checkpoint),
        "images": ["%dx%d JPEG" % Image.open(io.BytesIO(image)).size for image in images],
        "max_tiles": max_tiles,
        "num_tiles": num_tiles,
        "question": question,
        "max_tokens": max_tokens,
        "server_startup_s": startup_s,
        "ttft_triton": ttft_triton,
        "ttft_inprocess_first_token": ttft_inproc,
        "ttft_inprocess_first_text_delta": summary([r[1] for r in inproc_runs], oks),
        "total_triton": summary([r[1] for r in triton_runs], oks),
        "total_inprocess": summary([r[2] for r in inproc_runs], oks),
        "server_stage_ms_per_request": stage_ms,
        "overhead": overhead,
        "overhead_ms": 1e3 * (ttft_triton["median_s"] - ttft_inproc["median_s"]),
    }


def _triton_stats(http_url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as response:
        stats = json.loads(response.read())
    return {m["name"]: m["inference_stats"] for m in stats["model_stats"]}


def _stats_delta(before: dict, after: dict, requests: int) -> dict:
    """Per model: ms per request in Triton's queue / compute_input / compute_infer / compute_output
    (for the decoupled llm, compute_infer is execute() only: it enqueues; generation runs on its thread)."""
    out = {}
    for model, stats in after.items():
        out[model] = {
            phase: (int(stats[phase]["ns"]) - int(before[model][phase]["ns"])) / 1e6 / requests
            for phase in ("queue", "compute_input", "compute_infer", "compute_output", "success")
        }
    return out
