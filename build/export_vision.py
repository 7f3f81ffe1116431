"""Export the vision encoder (ViT → pixel shuffle → projector) to ONNX with a dynamic tiles axis.

    python -m build.export_vision --model <checkpoint> [--out <file.onnx>]

Output `prompt_embedding_table` [T·Q, H] float32 for input `pixel_values` [T, 3, S, S] uint8 (RGB
tiles; the graph starts with the ImageNet normalization), T dynamic. Without --out, --dtype and
--ragged it writes the export `Pipeline.from_pretrained` would make on first use (with its stamp).
`--precision int8` writes the int8 graph `Pipeline.from_pretrained(..., vision_precision="int8")`
loads (engine/vision_precision.py), quantized from the float32 export.
The GPU path compiles the `--ragged` variant to a TensorRT plan: input flat [T·3·S·S] (how
Triton's TensorRT backend hands a model a ragged batch of requests), output [T, Q, H] (so Triton
can scatter it back per request). The export itself is engine/vision_export.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from build.settings import HelpFormatter
from engine.vision_export import DTYPES, ensure_vision_onnx, export_vision_onnx, quantize_vision_onnx
from engine.vision_precision import VISION_PRECISIONS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.export_vision", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--out", type=Path, help="ONNX file (default: <model>/onnx/vision_encoder.onnx, or the per-user cache when <model> is read-only)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float16/bfloat16: for TensorRT (GPU path)")
    parser.add_argument("--ragged", action="store_true", help="flat input, [T, Q, H] output: the TensorRT plan's layout")
    parser.add_argument("--precision", choices=VISION_PRECISIONS, default="float32", help="int8: the CPU path's quantized graph (not with --dtype, --ragged)")
    args = parser.parse_args()
    if args.precision != "float32" and (args.dtype != "float32" or args.ragged):
        parser.error(f"--precision {args.precision} quantizes the float32 CPU graph: not with --dtype or --ragged")
    if args.out is None and args.dtype == "float32" and not args.ragged:
        print(ensure_vision_onnx(args.model, precision=args.precision))
    elif args.precision != "float32":
        print(quantize_vision_onnx(ensure_vision_onnx(args.model), args.out))
    else:
        print(export_vision_onnx(args.model, args.out, args.dtype, args.ragged))


if __name__ == "__main__":
    main()
