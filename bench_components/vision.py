"""Section vision: InternViT-300M (internvl3_5-1b preset), ONNX Runtime configs vs PyTorch eager, fp32; and the
engine's int8 graph (vision_precision="int8") against the fp32 one: speed, per-tile cosine, max |Δ|."""

from __future__ import annotations

import gc
import json
import time
import warnings
from pathlib import Path

import numpy as np

from bench_components.common import CKPT_1B, PROBE, THREADS, log, race
from client.synthetic import synthetic_image


def _cached(target: Path, stamp: dict, make) -> tuple[Path, float | None]:
    """(target, seconds spent making it or None when the cached one was valid)."""
    stamp_file = target.with_suffix(target.suffix + ".stamp.json")
    if target.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return target, None
    start = time.perf_counter()
    make(target)
    stamp_file.write_text(json.dumps(stamp))
    return target, time.perf_counter() - start


def vision_artifacts(out: Path, checkpoint: Path, variants: bool) -> dict:
    from build.checkpoint import generate
    from engine.vision_export import export_stamp, export_vision_onnx, quantize_vision_onnx, vision_stamp

    generate("internvl3_5-1b", "qwen3", checkpoint)
    stamp = export_stamp(checkpoint)
    onnx_file, spent = _cached(out / "vision_internvl3_5-1b.onnx", stamp, lambda t: export_vision_onnx(checkpoint, t))
    log(f"vision: ONNX {onnx_file.name} " + (f"exported in {spent:.0f} s" if spent else "(cached)"))
    int8_stamp = vision_stamp(checkpoint, "int8")
    target, spent = _cached(out / "vision_internvl3_5-1b.int8.onnx", int8_stamp, lambda t: quantize_vision_onnx(onnx_file, t))
    log("vision: int8 graph (engine/vision_precision.py) " + (f"quantized in {spent:.0f} s" if spent else "(cached)"))
    artifacts = {"fp32": onnx_file, "int8": target}
    if not variants:
        return artifacts
    fusion_stats = {}

    def optimize(target: Path, model_type: str):
        from onnxruntime.transformers.optimizer import optimize_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = optimize_model(str(onnx_file), model_type=model_type, num_heads=16, hidden_size=1024, opt_level=0)
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        target.with_suffix(".fusions.json").write_text(json.dumps(stats))
        model.save_model_to_file(str(target), use_external_data_format=False)

    for model_type in ("vit", "bert"):
        target, spent = _cached(out / f"vision_internvl3_5-1b.opt_{model_type}.onnx", stamp, lambda t, m=model_type: optimize(t, m))
        fusion_stats[model_type] = json.loads(target.with_suffix(".fusions.json").read_text())
        log(f"vision: optimize_model(model_type={model_type!r}) fusions {fusion_stats[model_type]}" + (f" ({spent:.0f} s)" if spent else " (cached)"))
        artifacts[f"opt_{model_type}"] = target
    artifacts["fusions"] = fusion_stats
    return artifacts


def bench_vision(out: Path, quick: bool) -> dict:
    import torch

    from engine.config import ModelConfig
    from engine.preprocess import load_images
    from engine.vision import OnnxVisionEncoder, TorchVisionEncoder

    artifacts = vision_artifacts(out, CKPT_1B, variants=True)
    config = ModelConfig.from_pretrained(CKPT_1B)
    # Real tiles: a 3:2 photo -> 3x2 grid + thumbnail = 7 tiles; smaller batches are its first tiles.
    tiles, _ = load_images([synthetic_image(7, 1344, 896, "JPEG")], max_num=12, normalize=False)  # uint8
    batches = [1] if quick else [2, len(tiles)]
    inputs = {n: np.ascontiguousarray(tiles[:n]) for n in batches}
    small, big = batches[0], batches[-1]
    flops_per_tile = _vit_flops_per_tile(config)
    peak = PROBE.get("sgemm_gflops_2_threads") if THREADS >= 2 else PROBE.get("sgemm_gflops_1_thread")
    torch.set_num_threads(THREADS)
    log(f"vision: loading torch eager ({torch.get_num_threads()} threads) and ORT ({THREADS} intra-op threads)")
    encoders = {
        "torch_eager": TorchVisionEncoder(config),
        "ort_default": OnnxVisionEncoder(artifacts["fp32"], THREADS),
        "ort_int8": OnnxVisionEncoder(artifacts["int8"], THREADS),  # vision_precision="int8", raced with the fp32 ones
    }
    results = {
        "configs": {},
        "flops_per_tile": flops_per_tile,
        "sgemm_peak_gflops": peak,
        "batches": batches,
        "input": "tiles of a 1344x896 JPEG (3x2 grid + thumbnail), engine.preprocess",
    }
    reps = {1: 1} if quick else {2: 3, big: 2}
    # Main comparison: one warm-up at the biggest batch (arena growth), then interleaved timed runs.
    log(
        "vision: torch vs ORT, "
        + ", ".join(f"{n} tiles x{reps[n]}" for n in reversed(batches))
        + f" (+1 warm-up at {big}); ~4.5 s per tile per run"
    )
    timed, outputs = {}, {}

    def encode(name, n):
        outputs[name] = encoders[name].encode(inputs[n])  # the last output at the small batch is kept

    for i, n in enumerate(reversed(batches)):
        timed[n] = race({k: (lambda k=k, n=n: encode(k, n)) for k in encoders}, reps[n], warmup=1 if i == 0 else 0, label=f"vision {n} tiles")
    reference = outputs["torch_eager"]  # [small·Q, H]
    results["int8"] = _int8_accuracy(outputs["ort_int8"], outputs["ort_default"], small)
    results["int8"]["speedup_vs_fp32"] = {str(n): timed[n]["ort_default"]["median_s"] / timed[n]["ort_int8"]["median_s"] for n in batches}
    log(f"vision: int8 vs fp32 ORT: {results['int8']}")
    for name in encoders:
        results["configs"][name] = {
            "threads": THREADS,
            "max_abs_diff_vs_torch": float(np.abs(outputs[name] - reference).max()),
            **{str(n): _tile_rates(timed[n][name], n, flops_per_tile, peak) for n in batches},
        }
        log(f"vision: {name:12s} " + "  ".join(_rate_text(results["configs"][name][str(n)], n) for n in batches))
    if not quick:
        results["profile_ort_default"] = _ort_profile(artifacts["fp32"], inputs[small][:1], out)
    default = encoders["ort_default"]
    del encoders
    gc.collect()
    # Variants: which ORT config should engine/vision.py use? Each one races the engine's default
    # session on the same 1-tile input (interleaved), so the ratio is paired despite a noisy VM.
    variants = {
        "ort_1_thread": (artifacts["fp32"], 1, False, "fp32 graph, intra_op_num_threads=1"),
        "ort_spin": (artifacts["fp32"], THREADS, True, f"fp32, {THREADS} threads, allow_spinning=1 (ORT's default)"),
        "ort_opt_vit": (artifacts["opt_vit"], THREADS, False, "transformers optimize_model(model_type='vit', 16 heads, 1024)"),
    }
    if quick:
        del variants["ort_1_thread"], variants["ort_spin"]
    if artifacts["fusions"]["bert"] != artifacts["fusions"]["vit"]:
        variants["ort_opt_bert"] = (artifacts["opt_bert"], THREADS, False, "transformers optimize_model(model_type='bert')")
    reps_variant = 1 if quick else 2
    one = inputs[small][:1]
    log(f"vision: variants, 1 tile, each x{reps_variant} interleaved with the default session")
    for name, (onnx_file, threads, spinning, note) in variants.items():
        encoder = OnnxVisionEncoder(onnx_file, threads, spin=spinning)
        got = encoder.encode(one)  # warm-up (the default session is warm)
        timed = race({name: lambda: encoder.encode(one), "ort_default": lambda: default.encode(one)}, reps_variant, warmup=0, label=f"vision {name}")
        ref = reference[: len(got)]
        rates = _tile_rates(timed[name], 1, flops_per_tile, peak)
        rates["default_same_race"] = _tile_rates(timed["ort_default"], 1, flops_per_tile, peak)
        rates["vs_default"] = rates["tiles_per_s"] / rates["default_same_race"]["tiles_per_s"]
        results["configs"][name] = {
            "threads": threads,
            "note": note,
            "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
            "rel_l2_error_vs_torch": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "1": rates,
        }
        log(f"vision: {name:12s} {_rate_text(rates, 1)}, {rates['vs_default']:.2f}x default ({note})")
        del encoder
        gc.collect()
    del default
    gc.collect()
    results["fusions"] = artifacts["fusions"]
    fp32 = {k: v["1"]["vs_default"] for k, v in results["configs"].items() if "1" in v and "vs_default" in v["1"]}
    fp32["ort_default"] = 1.0
    results["fastest_fp32_ort_config"] = max(fp32, key=fp32.get)
    results["speedup_ort_vs_torch"] = {
        str(n): results["configs"]["ort_default"][str(n)]["tiles_per_s"] / results["configs"]["torch_eager"][str(n)]["tiles_per_s"]
        for n in batches
    }
    return results


def _int8_accuracy(int8: np.ndarray, fp32: np.ndarray, tiles: int) -> dict:
    """The int8 graph's features against the fp32 graph's on the same tiles: per-tile cosine, max |Δ|."""
    a, b = int8.reshape(tiles, -1).astype(np.float64), fp32.reshape(tiles, -1).astype(np.float64)
    cosines = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"tiles": tiles, "min_cosine": float(cosines.min()), "max_abs_diff": float(np.abs(a - b).max()), "max_abs_fp32": float(np.abs(b).max())}


def _rate_text(rates: dict, tiles: int) -> str:
    # GFLOP/s count the fp32 model's FLOPs (for the int8 variant: fp32-equivalent work per second)
    return f"{tiles} tiles {rates['tiles_per_s']:.3f} tiles/s ({rates['gflops']:.0f} GFLOP/s, {100 * rates['pct_of_sgemm_peak']:.0f}% of fp32 sgemm peak)"


def _vit_flops_per_tile(config) -> float:
    v = config.vision
    tokens = (v.image_size // v.patch_size) ** 2 + 1
    c, inter = v.hidden_size, 4 * v.hidden_size
    per_layer = 2 * tokens * (4 * c * c + 2 * c * inter) + 2 * 2 * tokens * tokens * c  # projections + QK^T, AV
    projector = 2 * (tokens - 1) // 4 * (v.projector_in_size * config.text.hidden_size + config.text.hidden_size**2)
    patch = 2 * (tokens - 1) * 3 * v.patch_size**2 * c
    return float(v.num_layers * per_layer + projector + patch)


def _tile_rates(timing: dict, tiles: int, flops_per_tile: float, peak_gflops: float | None) -> dict:
    gflops = flops_per_tile * tiles / timing["median_s"] / 1e9
    return {
        **timing,
        "tiles_per_s": tiles / timing["median_s"],
        "best_tiles_per_s": tiles / timing["min_s"],
        "gflops": gflops,
        "pct_of_sgemm_peak": gflops / peak_gflops if peak_gflops else float("nan"),
    }


def _ort_profile(onnx_file: Path, x: np.ndarray, out: Path) -> dict:
    """Per-op-type kernel time of one ORT run (1 tile, engine settings): where the time goes."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(out / "ort_profile")
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    session.run(None, {"pixel_values": x})
    start = time.perf_counter()
    session.run(None, {"pixel_values": x})
    wall = time.perf_counter() - start
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    last_run = max(e["ts"] for e in events if e.get("name") == "model_run")
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_run:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3
    trace.unlink()
    total = sum(per_op.values())
    top = {k: round(v, 1) for k, v in per_op.most_common(8)}
    log(f"vision: ORT profile, 1 tile: wall {wall * 1e3:.0f} ms, kernels {total:.0f} ms: {top}")
    return {"wall_ms": wall * 1e3, "kernel_ms": total, "per_op_ms": top}
