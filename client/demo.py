"""`make demo`: generate the tiny checkpoint (cached), export the vision ONNX, stream a reply.

The checkpoint has seeded random weights (real InternVL shapes), so the reply is meaningless
text: the demo shows the pipeline running end to end, not model quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from build.checkpoint import generate
from build.export_vision import export_vision_onnx
from engine.pipeline import Pipeline
from engine.vision import default_onnx_path

SAMPLE = Path(__file__).with_name("samples") / "lake_house.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/checkpoints/tiny-qwen3"))
    parser.add_argument("--image", type=Path, default=SAMPLE)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("question", nargs="?", default="Describe the image in detail.")
    args = parser.parse_args()

    print(f"checkpoint: {generate('tiny', 'qwen3', args.checkpoint)} (random weights: the reply is meaningless)")
    if not default_onnx_path(args.checkpoint).is_file():
        print(f"vision ONNX: {export_vision_onnx(args.checkpoint)}")
    pipe = Pipeline.from_pretrained(args.checkpoint, vision_backend="onnxruntime")
    print(f"User: <image {args.image.name}>\n{args.question}\nAssistant: ", end="", flush=True)
    start = time.perf_counter()
    first = None
    for delta in pipe.stream(args.question, [args.image.read_bytes()], max_new_tokens=args.max_new_tokens):
        first = first or time.perf_counter()
        sys.stdout.write(delta)
        sys.stdout.flush()
    end = time.perf_counter()
    print(f"\n\n[in-process pipeline, CPU] time to first text {first - start:.2f} s, total {end - start:.2f} s")


if __name__ == "__main__":
    main()
