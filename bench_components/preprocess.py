"""Section pre: engine.preprocess against the model cards' load_image in its real stack.

The reference runs in its own interpreter (torch 2.14.1, torchvision 0.29.1, Pillow 13, numpy 1.26.4;
`--reference-python PATH`, or a venv made on first use in OUT/seed-venv, pip taking the wheels from
this machine's disk), the card's code (bench_components/seed_card.py) at torch's default thread count.
Both sides run as processes of bench_components/seed_reference.py on the same files, alternating
ours/seed (A B, B A, ...), each timing inside itself after warm-ups; a round's number is that
process's median, and the section reports medians over rounds. Outputs are checked equal first.
Measured at every core count from all down to 1 (the processes pinned to that many CPUs).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench_components.common import HEALTH, ROOT, THREADS, log, summary
from client.synthetic import synthetic_image

SEED_STACK = ("torch==2.14.1", "torchvision==0.29.1", "pillow==13.0.0", "numpy==1.26.4")
WORKER = ROOT / "bench_components" / "seed_reference.py"
SINGLE = (1920, 1080, "JPEG", "RGB")

# (width, height, format, mode): photos, screenshots, portrait, panorama, small, grayscale, RGBA
MIXED_SHAPES = [
    (1920, 1080, "JPEG", "RGB"),
    (1280, 720, "PNG", "RGB"),
    (640, 480, "JPEG", "RGB"),
    (1024, 1024, "WEBP", "RGB"),
    (2048, 1536, "JPEG", "RGB"),
    (720, 1280, "JPEG", "RGB"),
    (1600, 400, "PNG", "RGBA"),
    (320, 240, "JPEG", "L"),
]


def reference_python(out: Path, given: str | None) -> tuple[str, str]:
    """-> (interpreter, its versions line); makes OUT/seed-venv with SEED_STACK when none is given."""
    python = given
    if python is None:
        venv = out / "seed-venv"
        python, stamp = str(venv / "bin" / "python"), venv / "seed-stack.txt"
        if not stamp.exists() or stamp.read_text() != " ".join(SEED_STACK):
            log(f"pre: making the reference interpreter {venv} ({' '.join(SEED_STACK)}; ~5.5 GB, a few minutes)")
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            subprocess.run([python, "-m", "pip", "install", "-qq", *SEED_STACK], check=True)
            stamp.write_text(" ".join(SEED_STACK))
    probe = "import PIL, numpy, torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}, numpy {numpy.__version__}')"
    versions = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if versions.returncode:
        raise SystemExit(f"the reference interpreter {python} cannot import torch + torchvision + Pillow: {versions.stderr.strip()[-500:]}")
    return python, versions.stdout.strip()


def _write_images(folder: Path) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    single = folder / "single_1920x1080.jpg"
    single.write_bytes(synthetic_image(0, *SINGLE))
    batch = []
    for i in range(32):
        w, h, fmt, mode = shape = MIXED_SHAPES[i % len(MIXED_SHAPES)]
        batch.append(folder / f"mixed_{i:02d}_{w}x{h}_{mode}.{fmt.lower()}")
        batch[-1].write_bytes(synthetic_image(100 + i, *shape))
    return single, batch


def _candidates(python: str, cores: int) -> dict[str, tuple[str, str, list[str]]]:
    # name -> (interpreter, --impl, extra arguments)
    out = {"ours": (sys.executable, "ours", []), "seed": (python, "seed", [])}
    if cores > 1:  # info: the cards' stack with torch at one thread, what a busy machine's deployer would set
        out["seed_torch1"] = (python, "seed", ["--torch-threads", "1"])
    return out


def _run(candidate: tuple, cores: int, files: list[Path], reps: int, batch_reps: int, warmup: int = 2, dump: Path | None = None) -> dict:
    python, impl, extra = candidate
    cmd = [python, "-P", str(WORKER), "--impl", impl, "--cores", str(cores), "--reps", str(reps), "--batch-reps", str(batch_reps), "--warmup", str(warmup), *extra]
    proc = subprocess.run(cmd + (["--dump", str(dump)] if dump else []) + [str(f) for f in files], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"the {impl} timing process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parity(python: str, files: list[Path], folder: Path) -> tuple[dict, list[int]]:
    # -> ({"single": max |Δ|, "batch": max |Δ|}, tiles per file), both sides' outputs compared
    for impl in ("ours", "seed"):
        _run(_candidates(python, THREADS)[impl], THREADS, files, reps=0, batch_reps=0, warmup=0, dump=folder / impl)
    diffs, tiles = {"single": 0.0, "batch": 0.0}, []
    for name in [str(i) for i in range(len(files))] + ["batch"]:
        ours, seed = (np.load(folder / impl / f"{name}.npy") for impl in ("ours", "seed"))
        assert ours.shape == seed.shape, f"file {name}: ours {ours.shape} vs seed {seed.shape}"
        diff = float(np.abs(ours - seed).max())
        assert diff <= 1e-6, f"preprocess mismatch vs the real seed stack, file {name}: max |Δ| {diff}"
        key = "single" if name == "0" else "batch"
        diffs[key] = max(diffs[key], diff)
        tiles.append(len(ours))
    return diffs, tiles[: len(files)]


def _rounds(python: str, cores: int, rounds: int, files: list[Path], reps: int, batch_reps: int) -> dict:
    candidates = _candidates(python, cores)
    per = {name: {"single": [], "batch": []} for name in candidates}
    healthy, loads = [], []
    for r in range(rounds):
        label = f"pre {cores} core(s)"
        before = HEALTH.gate(label)
        loads.append(round(os.getloadavg()[0], 2))
        for name in list(candidates)[:: 1 if r % 2 == 0 else -1]:
            result = _run(candidates[name], cores, files, reps, batch_reps)
            per[name]["single"].append(statistics.median(result["single_s"]))
            per[name]["batch"].append(statistics.median(result["batch_s"]))
        healthy.append(before and HEALTH.probe(label))
        times = ", ".join(f"{name} {d['single'][-1] * 1e3:.1f} ms / {d['batch'][-1]:.2f} s" for name, d in per.items())
        log(f"pre {cores} core(s) round {r + 1}/{rounds} (single / 32 images): {times}; load {loads[-1]}")
    out = {name: {k: summary(v, healthy) for k, v in d.items()} for name, d in per.items()}
    n = len(files) - 1
    out["images_per_s"] = {name: n / out[name]["batch"]["median_s"] for name in candidates}
    out["single_speedup"] = out["seed"]["single"]["median_s"] / out["ours"]["single"]["median_s"]
    out["batch_speedup"] = out["images_per_s"]["ours"] / out["images_per_s"]["seed"]
    out["loadavg_1min"] = loads
    return out


def bench_preprocess(out: Path, quick: bool, reference: str | None = None) -> dict:
    python, stack = reference_python(out, reference)
    single, batch = _write_images(out / "pre_images")
    files = [single, *batch]
    diffs, tiles = _parity(python, files, out / "pre_outputs")
    log(f"pre: reference {python} ({stack}); outputs equal to the seed's (max |Δ| single {diffs['single']:g}, 32 images {diffs['batch']:g})")
    reps, batch_reps = (3, 1) if quick else (5, 2)
    by_cores = {}
    for cores in range(THREADS, 0, -1):  # all cores first: the goals are stated there
        rounds = (2 if quick else 5) if cores == THREADS else (1 if quick else 3)
        by_cores[str(cores)] = _rounds(python, cores, rounds, files, reps, batch_reps)
    top = by_cores[str(THREADS)]
    log(
        f"pre: single {top['ours']['single']['median_s'] * 1e3:.1f} ms vs seed {top['seed']['single']['median_s'] * 1e3:.1f} ms "
        f"({top['single_speedup']:.2f}x); 32 images {top['images_per_s']['ours']:.1f} vs {top['images_per_s']['seed']:.1f} img/s ({top['batch_speedup']:.2f}x)"
    )
    return {
        "reference": {
            "python": python,
            "stack": stack,
            "code": "bench_components/seed_card.py (seed 004's load_image); seed: torch at as many threads as cores, seed_torch1: at 1",
        },
        "ours": "engine.preprocess: load_image for the single image, load_images for the 32",
        "single": {"image": "1920x1080 JPEG q90, max_num=12", "tiles": tiles[0], "max_abs_diff": diffs["single"]},
        "batch": {"images": [p.name for p in batch], "tiles": sum(tiles[1:]), "max_abs_diff": diffs["batch"]},
        "by_cores": by_cores,
    }
