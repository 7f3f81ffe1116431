"""bench_components section pre: the timing process (our side; the seed's needs the reference
interpreter, torch 2.14.1 + torchvision, which only the benchmark installs) and the report rows."""

import json
import subprocess
import sys

import numpy as np

from bench_components.preprocess import WORKER
from bench_components.report import table_rows
from client.synthetic import synthetic_image
from engine.preprocess import load_image, load_images


def test_timing_process_times_and_dumps_our_outputs(tmp_path):
    files = []
    for name, shape in [("a.jpg", (640, 480, "JPEG")), ("b.png", (300, 900, "PNG")), ("c.jpg", (1280, 720, "JPEG"))]:
        files.append(tmp_path / name)
        files[-1].write_bytes(synthetic_image(len(files), *shape))
    cmd = [sys.executable, "-P", str(WORKER), "--impl", "ours", "--cores", "1", "--reps", "2", "--batch-reps", "1", "--warmup", "0"]
    out = subprocess.run([*cmd, "--dump", str(tmp_path / "dump"), *map(str, files)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["threads"] == 1 and len(result["single_s"]) == 2 and len(result["batch_s"]) == 1
    for i, path in enumerate(files):
        np.testing.assert_array_equal(np.load(tmp_path / "dump" / f"{i}.npy"), load_image(path))
    np.testing.assert_array_equal(np.load(tmp_path / "dump" / "batch.npy"), load_images(files[1:])[0])


def test_report_rows_per_core_count():
    def side(single_s, batch_s):
        return {k: {"median_s": v, "min_s": v} for k, v in (("single", single_s), ("batch", batch_s))}

    def cores(ours, seed, **extra):
        r = {"ours": side(*ours), "seed": side(*seed), **{k: side(*v) for k, v in extra.items()}}
        r["images_per_s"] = {k: 32 / r[k]["batch"]["median_s"] for k in ("ours", "seed", *extra)}
        r["single_speedup"] = seed[0] / ours[0]
        r["batch_speedup"] = seed[1] / ours[1]
        return r

    results = {
        "preprocess": {
            "single": {"tiles": 9},
            "batch": {"tiles": 324},
            "by_cores": {"2": cores((0.05, 1.0), (0.1, 4.0), seed_torch1=(0.07, 2.5)), "1": cores((0.1, 3.0), (0.11, 4.0))},
        }
    }
    rows = [r for r in table_rows(results) if r["section"] == "preprocess"]
    assert [r["result"] for r in rows] == ["2.00x", "4.00x", "1.40x, 2.50x", "1.10x, 1.33x"]
    assert [r["met"] for r in rows[:2]] == [True, True]
    assert "pinned to 1 core" in rows[3]["metric"]
