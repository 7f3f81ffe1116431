"""Section pre: engine.preprocess vs the seed reference (tests/reference_preprocess.py, torch at 1 thread)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np

from bench_components.common import ROOT, THREADS, log, race
from client.synthetic import synthetic_image


def _reference_module():
    spec = importlib.util.spec_from_file_location("reference_preprocess", ROOT / "tests" / "reference_preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def mixed_images(count: int = 32) -> list[bytes]:
    return [synthetic_image(100 + i, *MIXED_SHAPES[i % len(MIXED_SHAPES)]) for i in range(count)]


def bench_preprocess(quick: bool) -> dict:
    import torch

    from engine.preprocess import load_image, load_images

    ref = _reference_module()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference: torch at 1 thread (its per-tile ops are tiny)
    try:
        # (a) one 1920x1080 JPEG, max_num=12
        single = synthetic_image(0, 1920, 1080, "JPEG")
        ours = load_image(single, max_num=12)
        theirs = ref.load_image(io.BytesIO(single), max_num=12).numpy()
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        diff_single = float(np.abs(ours - theirs).max())
        assert diff_single <= 1e-6, f"preprocess mismatch vs reference: max |Δ| {diff_single}"
        reps = 5 if quick else 20
        log(f"pre (a): 1920x1080 JPEG -> {len(ours)} tiles, outputs equal (max |Δ| {diff_single:g}); {reps} reps each")
        a = race(
            {"ours": lambda: load_image(single, max_num=12), "reference": lambda: ref.load_image(io.BytesIO(single), max_num=12)},
            reps,
            warmup=2,
            label="preprocess single",
        )
        # (b) throughput over 32 mixed images
        images = mixed_images(32)
        ours_all, counts = load_images(images, max_num=12)
        theirs_all = [ref.load_image(io.BytesIO(b), max_num=12).numpy() for b in images]
        assert counts == [len(t) for t in theirs_all], "tile counts differ from the reference"
        diff_batch = float(np.abs(ours_all - np.concatenate(theirs_all)).max())
        assert diff_batch <= 1e-6, f"preprocess mismatch vs reference over the mixed set: max |Δ| {diff_batch}"
        reps = 2 if quick else 5
        # No extra warm-up: the equality check above just ran both on these very images.
        log(
            f"pre (b): 32 mixed images ({sum(counts)} tiles, {sum(map(len, images)) / 1e6:.1f} MB encoded), "
            f"outputs equal (max |Δ| {diff_batch:g}); {reps} reps each"
        )
        b = race(
            {
                "ours_load_images": lambda: load_images(images, max_num=12),
                "reference_loop": lambda: [ref.load_image(io.BytesIO(x), max_num=12) for x in images],
                "ours_load_image_loop": lambda: [load_image(x, max_num=12) for x in images],  # info: 1 image at a time
            },
            reps,
            warmup=0,
            label="preprocess 32 images",
        )
    finally:
        torch.set_num_threads(torch_threads)
    speedup_a = a["reference"]["median_s"] / a["ours"]["median_s"]
    n = len(images)
    ips = {k: n / v["median_s"] for k, v in b.items()}
    speedup_b = ips["ours_load_images"] / ips["reference_loop"]
    log(
        f"pre: single {a['ours']['median_s'] * 1e3:.1f} ms vs ref {a['reference']['median_s'] * 1e3:.1f} ms "
        f"({speedup_a:.2f}x); 32 images {ips['ours_load_images']:.1f} vs {ips['reference_loop']:.1f} img/s ({speedup_b:.2f}x)"
    )
    return {
        "threads": {"ours": f"numpy+PIL, pool of {THREADS} threads", "reference": "torch.set_num_threads(1), one image at a time"},
        "single": {
            "image": "1920x1080 JPEG q90, max_num=12",
            "tiles": len(ours),
            "max_abs_diff": diff_single,
            "ours": a["ours"],
            "reference": a["reference"],
            "speedup": speedup_a,
        },
        "batch": {
            "images": [f"{w}x{h} {fmt} {mode}" for w, h, fmt, mode in MIXED_SHAPES] * 4,
            "tiles": sum(counts),
            "max_abs_diff": diff_batch,
            "timings": b,
            "images_per_s": ips,
            "tiles_per_s": {k: sum(counts) / v["median_s"] for k, v in b.items()},
            "speedup": speedup_b,
        },
    }
