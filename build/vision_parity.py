"""Compare the TensorRT vision plan with ONNX Runtime on the same random tiles (GPU path).

    python -m build.vision_parity --model <checkpoint> --plan <dir>/vision/vision_encoder.plan [--tiles 1,4,13] [--min-cosine 0.999]

The reference is the float32 ragged export run by ONNX Runtime (CUDA provider when present, else
CPU); the plan is run with the TensorRT runtime on CUDA. Prints, per batch size, the lowest
per-row cosine similarity and the largest absolute difference; exits 1 below --min-cosine.
TensorRT runtime calls as in NVIDIA/TensorRT release/10.14 python bindings (Runtime.
deserialize_cuda_engine, IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from build.settings import HelpFormatter
from engine.config import ModelConfig
from engine.vision import ONNX_INPUT, ONNX_OUTPUT


def row_agreement(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    # actual, expected: [T, Q, H] -> (lowest cosine over the T·Q rows, largest |difference|)
    a = actual.reshape(-1, actual.shape[-1]).astype(np.float64)
    e = expected.reshape(-1, expected.shape[-1]).astype(np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {actual.shape} vs {expected.shape}")
    if not len(a):
        return 1.0, 0.0
    cosine = (a * e).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(e, axis=-1), 1e-30)
    return float(cosine.min()), float(np.abs(a - e).max())


class PlanRunner:
    """The plan on CUDA: flat uint8 tiles in, [T, Q, H] out."""

    def __init__(self, plan: Path, config: ModelConfig):
        import tensorrt as trt
        import torch

        self.torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan).read_bytes())
        self.context = self.engine.create_execution_context()
        dtype = self.engine.get_tensor_dtype(ONNX_OUTPUT)
        self.out_dtype = {trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16}[dtype]
        self.q, self.h = config.vision.tokens_per_tile, config.text.hidden_size

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # pixels: uint8 [T, 3, S, S] -> [T, Q, H] float32
        torch = self.torch
        flat = torch.from_numpy(np.ascontiguousarray(pixels).reshape(-1)).cuda()
        out = torch.empty(len(pixels), self.q, self.h, dtype=self.out_dtype, device="cuda")
        self.context.set_input_shape(ONNX_INPUT, tuple(flat.shape))
        self.context.set_tensor_address(ONNX_INPUT, flat.data_ptr())
        self.context.set_tensor_address(ONNX_OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.float().cpu().numpy()


def compare(checkpoint: Path, plan: Path, tile_counts: list[int], seed: int = 0) -> list[dict]:
    import onnxruntime as ort

    from engine.vision_export import export_vision_onnx

    config = ModelConfig.from_pretrained(checkpoint)
    runner = PlanRunner(plan, config)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = export_vision_onnx(checkpoint, Path(tmp) / "reference.onnx", "float32", ragged=True)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        session = ort.InferenceSession(str(onnx_file), providers=providers)
        rng = np.random.default_rng(seed)
        size = config.vision.image_size
        rows = []
        for tiles in tile_counts:
            pixels = rng.integers(0, 256, (tiles, 3, size, size), dtype=np.uint8)
            expected = session.run([ONNX_OUTPUT], {ONNX_INPUT: pixels.reshape(-1)})[0]
            cosine, max_abs = row_agreement(runner(pixels), expected)
            rows.append({"tiles": tiles, "min_cosine": cosine, "max_abs_diff": max_abs, "reference": session.get_providers()[0]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.vision_parity", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--plan", type=Path, required=True, help="vision_encoder.plan from build.trt_vision")
    parser.add_argument("--tiles", default="1,4,13", help="comma-separated batch sizes (tiles per run)")
    parser.add_argument("--min-cosine", type=float, default=0.999, help="exit 1 when a row's cosine similarity is lower")
    args = parser.parse_args()
    rows = compare(args.model, args.plan, [int(t) for t in args.tiles.split(",")])
    for row in rows:
        print(f"{row['tiles']:>4} tiles  min cosine {row['min_cosine']:.6f}  max |diff| {row['max_abs_diff']:.3e}  (ONNX Runtime {row['reference']})")
    sys.exit(0 if all(row["min_cosine"] >= args.min_cosine for row in rows) else 1)


if __name__ == "__main__":
    main()
