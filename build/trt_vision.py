"""Compile the vision encoder's fp16/bf16 ONNX into a TensorRT plan (GPU path; needs CUDA + TensorRT).

    python -m build.trt_vision --model <checkpoint> --out <dir> [--dtype float16] [--opt-tiles N]
        [--max-images 4 --max-batch-size 8]  (the settings that size the profile)

Writes <dir>/vision_encoder.plan, <dir>/vision_encoder.json (dtype, tiles profile, Q, hidden size,
tensor names, TensorRT version) and keeps <dir>/timing.cache for the next build. The network is
strongly typed, so the precision is the ONNX graph's (build/export_vision.py --dtype): no
FP16/BF16 builder flags, which TensorRT refuses on strongly typed networks (deprecated since 10.12).
The graph is the ragged export (flat uint8 input, [T, Q, H] output): Triton's TensorRT backend
concatenates a dynamic batch of requests' tiles into one flat tensor and scatters the output back
by each request's tile count (tensorrt_backend src/instance_state.cc: ragged inputs must be 1-D
in the engine; batch_output BATCH_SCATTER_WITH_INPUT_SHAPE).
API followed: NVIDIA/TensorRT release/10.14 python bindings (python/src/infer/pyCore.cpp,
python/docstrings/infer/pyCoreDoc.h: Builder.create_network, OnnxParser.parse_from_file,
IOptimizationProfile.set_shape, IBuilderConfig.create_timing_cache / set_timing_cache,
Builder.build_serialized_network); tensorrt~=10.14.1 is what tensorrt-llm 1.2.1 pins.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from build.gpu_toolchain import check_version
from engine.vision_export import export_vision_onnx
from build.settings import GPU_DTYPES, BuildSettings, HelpFormatter, add_arguments, from_arguments
from engine.config import ModelConfig
from engine.preprocess import tile_grid
from engine.vision import ONNX_INPUT, ONNX_OUTPUT

PLAN, METADATA, TIMING_CACHE = "vision_encoder.plan", "vision_encoder.json", "timing.cache"
WORKSPACE_BYTES = 8 << 30


@dataclass(frozen=True)
class TilesProfile:
    """The optimization profile on the tiles of one engine run (a dynamic batch of requests).
    min 0: a batch of text-only requests runs the engine on an empty tensor."""

    min_tiles: int
    opt_tiles: int
    max_tiles: int

    def __post_init__(self):
        if not (0 <= self.min_tiles <= self.opt_tiles <= self.max_tiles and self.max_tiles >= 1):
            raise ValueError(f"need 0 ≤ min ≤ opt ≤ max tiles and max ≥ 1, got {self.min_tiles}, {self.opt_tiles}, {self.max_tiles}")

    def shapes(self, image_size: int) -> tuple[tuple[int], tuple[int], tuple[int]]:
        # -> (min, opt, max) shapes of the flat pixel_values [T·3·S·S] for IOptimizationProfile.set_shape
        return tuple((t * 3 * image_size * image_size,) for t in (self.min_tiles, self.opt_tiles, self.max_tiles))


def engine_metadata(config: ModelConfig, dtype: str, profile: TilesProfile, tensorrt_version: str, memory: dict | None = None) -> dict:
    """memory: {"plan_bytes", "device_memory_bytes"} of the built plan (build/gpu_memory.py sizes the KV
    cache of an LLM rank sharing the GPU with it)."""
    return {
        "memory": memory,
        "dtype": dtype,
        # engine shapes; Triton's config declares pixel_values per request as [-1, 3, S, S]
        "input": {"name": ONNX_INPUT, "dtype": "uint8", "shape": [-1]},
        "output": {"name": ONNX_OUTPUT, "dtype": dtype, "shape": [-1, config.vision.tokens_per_tile, config.text.hidden_size]},
        "tiles_profile": asdict(profile),
        "tokens_per_tile": config.vision.tokens_per_tile,
        "hidden_size": config.text.hidden_size,
        "tensorrt": tensorrt_version,
    }


def timing_cache(builder_config, cache_file: Path):
    """The timing cache of earlier builds if TensorRT takes it, else a fresh one. IBuilderConfig.
    set_timing_cache returns False for a cache from another TensorRT version or device (TensorRT 10
    Python API), which would otherwise go silently unused and then be written back as it was."""
    stored = cache_file.read_bytes() if cache_file.is_file() else b""
    for data in (stored, b"") if stored else (b"",):
        cache = builder_config.create_timing_cache(data)
        if builder_config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    raise RuntimeError("TensorRT refused a fresh timing cache")


def tensorrt():
    """The tensorrt module, checked: a plan runs only under the TensorRT that built it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise RuntimeError("TensorRT is not installed: build the GPU path inside the TensorRT-LLM Triton container (docs/GPU.md)") from None
    check_version("tensorrt", trt.__version__)
    return trt


def build_vision_engine(onnx_file: Path, out: Path, config: ModelConfig, profile: TilesProfile, dtype: str) -> Path:
    trt = tensorrt()
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # from a file: external weight files are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_file}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(ONNX_INPUT, *profile.shapes(config.vision.image_size))
    builder_config.add_optimization_profile(optimization_profile)
    cache_file = out / TIMING_CACHE
    cache = timing_cache(builder_config, cache_file)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_file} (see the log above)")
    (out / PLAN).write_bytes(bytes(plan))
    cache_file.write_bytes(bytes(cache.serialize()))
    # one execution context's activation memory at the profile max (TensorRT 10 Python API:
    # ICudaEngine.device_memory_size_v2); the plan file holds the weights
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    memory = {"plan_bytes": (out / PLAN).stat().st_size, "device_memory_bytes": int(engine.device_memory_size_v2)}
    metadata = engine_metadata(config, dtype, profile, trt.__version__, memory)
    (out / METADATA).write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return out / PLAN


def default_profile(config: ModelConfig, settings: BuildSettings = BuildSettings(), opt_tiles: int | None = None) -> TilesProfile:
    """max: a full Triton batch of requests at the per-request tile limit (the vision model batches
    up to settings.max_batch_size requests); opt: the tiles of one 1920x1080 photo
    (engine.preprocess.tile_grid), the common request."""
    max_tiles = settings.limits(config)["vision_max_tiles_per_run"]
    if opt_tiles is None:
        opt_tiles = tile_grid(1920, 1080, config.vision.image_size, config.max_num, config.min_num, config.use_thumbnail)[2]
    return TilesProfile(0, min(opt_tiles, max_tiles), max_tiles)


def build_vision_plan(config: ModelConfig, out: Path, settings: BuildSettings, dtype: str, opt_tiles: int | None = None) -> Path:
    """The ragged ONNX in `dtype` (out/vision_encoder.<dtype>.onnx), then its plan (out/vision_encoder.plan)."""
    tensorrt()  # before the export: without TensorRT nothing is written
    onnx_file = export_vision_onnx(config.path, out / f"vision_encoder.{dtype}.onnx", dtype, ragged=True)
    return build_vision_engine(onnx_file, out, config, default_profile(config, settings, opt_tiles), dtype)


# what default_profile reads (the profile's max tiles per run); the other settings do not touch the plan
PLAN_SETTINGS = ("max_images", "max_batch_size")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.trt_vision", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--dtype", choices=GPU_DTYPES, default="float16", help="precision of the exported graph and so of the plan")
    parser.add_argument("--opt-tiles", type=int, help="the shape TensorRT tunes for (default: a 16:9 photo's tiles)")
    add_arguments(parser, BuildSettings, only=PLAN_SETTINGS)
    args = vars(parser.parse_args())
    model, out, dtype, opt_tiles = (args.pop(k) for k in ("model", "out", "dtype", "opt_tiles"))
    try:
        print(build_vision_plan(ModelConfig.from_pretrained(model), out, from_arguments(BuildSettings, args), dtype, opt_tiles))
    except (RuntimeError, ValueError) as error:  # no TensorRT, another version, a bad checkpoint or setting
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
