"""Section vision_runs: how many tiles ONNX Runtime should take per run (engine/vision.py TILES_PER_RUN).
The Triton vision encoder gets a batch of requests' tiles; it can encode them in one run or one tile per
run. Raced on the 9 tiles of a 1280x720 JPEG (4x2 grid + thumbnail), fp32 and int8 graphs of
InternViT-300M, interleaved rounds after each session's first run of that shape, which is timed apart
(a new input shape's first run was the slow one)."""

from __future__ import annotations

import gc
import time

import numpy as np

from bench_components.common import CKPT_1B, THREADS, log, race
from bench_components.vision import vision_artifacts
from client.synthetic import synthetic_image


def bench_vision_runs(out, quick: bool) -> dict:
    from engine.preprocess import load_images
    from engine.vision import OnnxVisionEncoder

    graphs = vision_artifacts(out, CKPT_1B, variants=False)
    tiles, _ = load_images([synthetic_image(5, 1280, 720, "JPEG")], max_num=12, normalize=False)  # uint8 [9, 3, 448, 448]
    reps = 1 if quick else 3
    results = {"tiles": len(tiles), "threads": THREADS, "reps": reps}
    for graph in ("fp32", "int8"):
        encoders = {"one_tile": OnnxVisionEncoder(graphs[graph], THREADS), "whole_batch": OnnxVisionEncoder(graphs[graph], THREADS, tiles_per_run=None)}
        first = {}
        for name, encoder in encoders.items():
            encoder.encode(tiles[:1])  # both sessions have run one tile; the 9-tile shape is new to them
            start = time.perf_counter()
            encoder.encode(tiles)
            first[name] = time.perf_counter() - start
        log(f"vision_runs: {graph}, first run of {len(tiles)} tiles: " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()))
        timed = race({name: (lambda e=encoder: e.encode(tiles)) for name, encoder in encoders.items()}, reps, warmup=0, label=f"vision_runs {graph}")
        results[graph] = {
            **{name: {**timed[name], "first_run_s": first[name], "tiles_per_s": len(tiles) / timed[name]["median_s"]} for name in encoders},
            "speedup": timed["whole_batch"]["median_s"] / timed["one_tile"]["median_s"],
        }
        log(f"vision_runs: {graph}, one tile per run {results[graph]['speedup']:.2f}x the whole batch ({reps} interleaved rounds)")
        del encoders
        gc.collect()
    return results
