"""One timing process of section pre, the same for both sides: `--impl seed` runs the model cards'
load_image (bench_components/seed_card.py) in the reference interpreter (torch 2.14.1, torchvision
0.29.1, Pillow 13), `--impl ours` runs engine.preprocess in the project's venv. Both read the same
files, time inside the process after warm-ups, and print one JSON line:
{"single_s": [...], "batch_s": [...], "threads": N}.

    PYTHON -P bench_components/seed_reference.py --impl seed|ours --cores N [--reps R] [--batch-reps B]
        [--warmup W] [--torch-threads T] [--dump DIR] SINGLE_FILE BATCH_FILE...

--cores N pins the process to N of its CPUs before torch or numpy start their threads (torch also gets
set_num_threads(N), or --torch-threads T; our pool sizes itself from the affinity). --dump DIR writes
each file's output as DIR/<index>.npy (float32 [T, 3, 448, 448]; index 0 is the single file) and the
batch's tiles as DIR/batch.npy, for the parity check, untimed.
Standard library only at the top: the two interpreters share nothing else.
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pin(cores):
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:cores])
    # OpenMP (torch's intra-op pool) reads this at start; set_num_threads below as well
    os.environ["OMP_NUM_THREADS"] = str(cores)


def _loaders(impl, threads):
    # -> (load one file -> float32 tensor/array, load a list of files -> list or stacked array)
    if impl == "seed":
        import torch

        torch.set_num_threads(threads)
        spec = importlib.util.spec_from_file_location("seed_card", Path(__file__).with_name("seed_card.py"))
        card = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(card)
        # the cards' multi-image scripts: one load_image per image, one after the other
        return card.load_image, lambda files: [card.load_image(f) for f in files]
    sys.path.insert(0, str(ROOT))
    from engine.preprocess import load_image, load_images

    return load_image, lambda files: load_images(files)[0]


def _times(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main():
    parser = argparse.ArgumentParser(prog="python -m bench_components.seed_reference")
    parser.add_argument("--impl", choices=("seed", "ours"), required=True)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch-reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, help="the seed's torch.set_num_threads (default: --cores)")
    parser.add_argument("--dump", type=Path)
    parser.add_argument("single", type=Path)
    parser.add_argument("batch", type=Path, nargs="*")
    args = parser.parse_args()
    _pin(args.cores)
    load_one, load_many = _loaders(args.impl, args.torch_threads or args.cores)
    if args.dump:
        import numpy as np

        args.dump.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate([args.single, *args.batch]):
            np.save(args.dump / f"{i}.npy", np.asarray(load_one(path), dtype=np.float32))
        if args.batch:  # the seed's list of per-image tensors, or our one array of all tiles
            many = load_many(args.batch)
            np.save(args.dump / "batch.npy", np.concatenate([np.asarray(x) for x in many]) if isinstance(many, list) else many)
    result = {"threads": args.cores, "single_s": _times(lambda: load_one(args.single), args.warmup, args.reps)}
    if args.batch:
        result["batch_s"] = _times(lambda: load_many(args.batch), 1 if args.batch_reps else 0, args.batch_reps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
