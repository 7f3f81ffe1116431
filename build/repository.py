"""`make build`: a checkpoint → OUT/ with the engines and a complete Triton model repository.

    python -m build.repository --model <checkpoint> --out <dir> [--target cpu|gpu] [--max-images 4 ...]
        gpu only: [--dtype float16] [--tp-size 1] [--pp-size 1] [--quantization none|...]
                  [--vision-gpus 0] [--llm-gpus 1,2] [--kv-cache-free-gpu-mem-fraction 0.85] ...

cpu: the vision ONNX (ONNX Runtime; --vision-precision int8: its dynamic int8 quantization,
engine/vision_precision.py) and the python-backend LLM. gpu (inside the TensorRT-LLM Triton
container, docs/GPU.md): the vision TensorRT plan and the TensorRT-LLM engine. Both targets share
the ensemble contract (preprocess → vision_encoder → llm → postprocess, same tensor names), so
clients cannot tell them apart. config.pbtxt files are filled from the templates in triton_repo/
(GPU-only models in triton_repo/gpu/) with values from the checkpoint's ModelConfig and the
settings (build/settings.py); nothing in a template is a model-specific number.
Re-running the cpu build is idempotent: the ONNX export is skipped unless the checkpoint or the
vision graph's code changed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import string
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from engine.vision_export import export_stamp, export_vision_onnx, quantize_vision_onnx, vision_stamp
from build.gpu_memory import kv_cache_fraction, shared_gpus
from build.gpu_toolchain import check_version
from build.settings import BuildSettings, GpuSettings, HelpFormatter, add_arguments, from_arguments
from build.trt_vision import METADATA, PLAN, PLAN_SETTINGS, build_vision_plan
from build.trtllm_engine import ENGINE_DIR, ENGINE_GPU_SETTINGS, ENGINE_SETTINGS, build_llm_engine, conversion_plan
from engine.config import ModelConfig
from engine.llm.guided import tokenizer_info
from engine.tokenizer import load_tokenizer
from engine.vision import ONNX_INPUT, ONNX_OUTPUT
from engine.vision_precision import onnx_file_name

TOKENIZER_INFO = "xgrammar_tokenizer_info.json"  # the name TensorRT-LLM's generator script writes

TEMPLATES = Path(__file__).resolve().parents[1] / "triton_repo"
# model name -> its template directory under triton_repo/
TARGET_MODELS = {
    "cpu": {m: m for m in ("preprocess", "vision_encoder", "llm", "postprocess", "internvl")},
    "gpu": {
        "preprocess": "preprocess",
        "vision_encoder": "gpu/vision_encoder",
        "tensorrt_llm": "gpu/tensorrt_llm",
        "llm": "gpu/llm",
        "postprocess": "postprocess",
        "internvl": "internvl",
    },
}
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
# CPU: what the vision model decodes on a feature-cache miss (encoded images, or a video and its
# frame numbers), with the content keys and the tile budget; the GPU preprocess decodes, so its
# ensemble maps none of them but the keys (which also reach the LLM step)
VISION_DECODE_INPUTS = ("image_data", "image_keys", "tile_budget", "video_data", "frame_indices")


def common_values(config: ModelConfig, settings: BuildSettings) -> dict:
    return {
        **asdict(settings),
        **settings.limits(config),
        "checkpoint": str(config.path.resolve()),
        "image_size": config.vision.image_size,
        "hidden_size": config.text.hidden_size,
        "tokens_per_tile": config.vision.tokens_per_tile,
        "vision_cache_bytes": settings.vision_cache_mib << 20,
        "vision_input": ONNX_INPUT,
        "vision_output": ONNX_OUTPUT,
        # InternVL3.5-Flash: the per-request token count of each tile reaches the LLM (engine/flash.py)
        "vision_tile_tokens": '\n      output_map { key: "tile_tokens" value: "vision_tile_tokens" }' if config.flash else "",
        "llm_tile_tokens": '\n      input_map { key: "tile_tokens" value: "vision_tile_tokens" }' if config.flash else "",
        # CPU: the vision model decodes and tiles the images itself, behind its feature cache
        "preprocess_decodes": "false",
        "preprocess_image_outputs": "".join(
            f'\n      output_map {{ key: "{name}" value: "preprocess_{name}" }}' for name in VISION_DECODE_INPUTS if name != "image_keys"
        ),
        "vision_image_inputs": "".join(f'\n      input_map {{ key: "{name}" value: "preprocess_{name}" }}' for name in VISION_DECODE_INPUTS),
    }


def write_tokenizer_info(config: ModelConfig, directory: Path) -> Path:
    """The xgrammar tokenizer info tensorrt_llm's guided decoding loads (engine/llm/guided.py
    tokenizer_info: TensorRT-LLM's examples/generate_xgrammar_tokenizer_info.py writes the same keys)."""
    path = Path(directory).resolve() / TOKENIZER_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tokenizer_info(load_tokenizer(config.path), [config.stop_token_id])), encoding="utf-8")
    return path


def gpu_values(config: ModelConfig, settings: BuildSettings, gpu: GpuSettings, vision_metadata: dict, engine_dir: Path, tokenizer_info_path: Path) -> dict:
    """Template values of the GPU models; tensor names and dtype come from the vision engine's metadata.
    tokenizer_info_path: write_tokenizer_info's file, which turns on tensorrt_llm's guided decoding."""
    if vision_metadata["dtype"] != gpu.dtype:
        raise ValueError(f"the vision plan is {vision_metadata['dtype']} but the LLM engine is {gpu.dtype}: the prompt table needs one dtype")
    expected = (config.vision.tokens_per_tile, config.text.hidden_size)
    if tuple(vision_metadata["output"]["shape"][1:]) != expected:
        raise ValueError(f"the vision plan outputs {vision_metadata['output']['shape']}, this checkpoint needs [-1, {expected[0]}, {expected[1]}]")
    plan_tiles, run_tiles = vision_metadata["tiles_profile"]["max_tiles"], settings.limits(config)["vision_max_tiles_per_run"]
    if plan_tiles < run_tiles:
        raise ValueError(f"the vision plan takes {plan_tiles} tiles per run; these settings batch up to {run_tiles}: rebuild it")
    placement = (
        f'parameters {{ key: "gpu_device_ids" value: {{ string_value: "{",".join(map(str, gpu.llm_gpus))}" }} }}'
        if gpu.llm_gpus
        else "# gpu_device_ids unset: the ranks use the visible GPUs in order"
    )
    return {
        **common_values(config, settings),
        **{k: v for k, v in asdict(gpu).items() if not isinstance(v, (tuple, bool))},
        "vision_input": vision_metadata["input"]["name"],
        "vision_output": vision_metadata["output"]["name"],
        # GPU: the TensorRT plan takes tiles, so preprocess decodes (no vision-feature cache there yet)
        "preprocess_decodes": "true",
        "preprocess_image_outputs": "",
        "vision_image_inputs": "",
        "prompt_table_dtype": TRITON_DTYPES[gpu.dtype],
        "vision_gpus": ", ".join(map(str, gpu.vision_gpus)),
        "engine_dir": str(Path(engine_dir).resolve()),
        "enable_kv_cache_reuse": str(gpu.enable_kv_cache_reuse).lower(),
        "llm_placement": placement,
        # model_instance_state.cc getGuidedDecodingConfigFromParams: "xgrammar" (the only backend it
        # accepts) + an existing info file set up the GuidedDecoder; either empty turns it off
        "guided_decoding_backend": "xgrammar",
        "xgrammar_tokenizer_info_path": str(Path(tokenizer_info_path).resolve()),
    }


def write_repository(repository: Path, target: str, values: dict) -> None:
    if repository.exists():
        shutil.rmtree(repository)
    for model, source in TARGET_MODELS[target].items():
        source, destination = TEMPLATES / source, repository / model
        (destination / "1").mkdir(parents=True)
        template = string.Template((source / "config.pbtxt.tmpl").read_text(encoding="utf-8"))
        (destination / "config.pbtxt").write_text(template.substitute(values), encoding="utf-8")
        adapter = source / "1" / "model.py"
        if adapter.is_file():
            shutil.copy2(adapter, destination / "1" / "model.py")


def build(checkpoint: str | Path, out: str | Path, settings: BuildSettings = BuildSettings()) -> Path:
    config = ModelConfig.from_pretrained(checkpoint)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    precision = settings.vision_precision
    fp32_file, onnx_file = out / onnx_file_name("float32"), out / onnx_file_name(precision)
    stamp_file = out / "build.json"
    stamp = vision_stamp(config.path, precision)
    previous = json.loads(stamp_file.read_text(encoding="utf-8")) if stamp_file.is_file() else {}
    # the int8 graph is quantized from the float32 one, which stays in OUT: exported again only when stale
    previous_export = {k: v for k, v in previous.get("stamp", {}).items() if k != "quantization"}
    exported = fp32_file.is_file() and previous_export == export_stamp(config.path)
    if exported and onnx_file.is_file() and (precision == "float32" or previous.get("stamp") == stamp):
        print(f"[1/2] vision ONNX up to date: {onnx_file}")
    else:
        started = time.perf_counter()
        if not exported:
            print("[1/2] exporting the vision encoder to ONNX (dynamic tiles axis) ...", flush=True)
            export_vision_onnx(config.path, fp32_file)
        if precision != "float32":
            print(f"[1/2] quantizing the vision ONNX to {precision} (engine/vision_precision.py) ...", flush=True)
            quantize_vision_onnx(fp32_file, onnx_file)
        print(f"      {onnx_file} ({time.perf_counter() - started:.1f} s)")
    values = {**common_values(config, settings), "onnx_file": str(onnx_file)}
    repository = out / "model_repository"
    write_repository(repository, "cpu", values)
    stamp_file.write_text(json.dumps({"stamp": stamp, "values": values}, indent=2), encoding="utf-8")
    print(f"[2/2] model repository: {repository} ({', '.join(TARGET_MODELS['cpu'])})")
    return out


def build_gpu(checkpoint: str | Path, out: str | Path, settings: BuildSettings, gpu: GpuSettings) -> Path:
    """The TensorRT vision plan, the TensorRT-LLM engine and the GPU repository (needs the container)."""
    if settings.vision_precision != "float32":
        raise ValueError(
            f"--vision-precision {settings.vision_precision} quantizes the CPU path's ONNX Runtime graph; the GPU path "
            "builds its TensorRT vision plan in --dtype (float16/bfloat16): leave --vision-precision at float32"
        )
    config = ModelConfig.from_pretrained(checkpoint)
    check_gpu_build(config, gpu)
    missing = [m for m in ("tensorrt", "tensorrt_llm") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not installed: build the GPU path inside the TensorRT-LLM Triton container (docs/GPU.md)")
    import tensorrt
    import tensorrt_llm

    check_version("tensorrt_llm", tensorrt_llm.__version__)
    check_version("tensorrt", tensorrt.__version__)
    out = Path(out).resolve()
    vision_dir, engine_dir = out / "vision", out / "llm" / ENGINE_DIR
    stamp = engines_stamp(config, settings, gpu)
    previous = json.loads((out / "build.json").read_text(encoding="utf-8")) if (out / "build.json").is_file() else {}
    plan = vision_dir / PLAN
    if previous.get("engines_stamp") == stamp and plan.is_file() and any(engine_dir.glob("rank*.engine")):
        # a container restart with the same checkpoint, settings and toolchain: hours of build saved
        print(f"[1/3] vision plan up to date: {plan}\n[2/3] LLM engine up to date: {engine_dir}", flush=True)
    else:
        print(f"[1/3] vision encoder → TensorRT plan ({gpu.dtype}, strongly typed) ...", flush=True)
        plan = build_vision_plan(config, vision_dir, settings, gpu.dtype)
        print(f"[2/3] language model → TensorRT-LLM engine ({gpu.dtype}, TP {gpu.tp_size} × PP {gpu.pp_size}, {gpu.quantization}) ...", flush=True)
        engine_dir = build_llm_engine(config.path, out / "llm", settings, gpu)
    metadata = json.loads((vision_dir / METADATA).read_text(encoding="utf-8"))
    gpu = replace(gpu, kv_cache_free_gpu_mem_fraction=_kv_cache_fraction(gpu, metadata, engine_dir))
    values = gpu_values(config, settings, gpu, metadata, engine_dir, write_tokenizer_info(config, out / "llm"))
    repository = out / "model_repository"
    write_repository(repository, "gpu", values)
    shutil.copy2(plan, repository / "vision_encoder" / "1" / "model.plan")  # Triton's default plan file name
    build_record = {"target": "gpu", "values": values, "engines_stamp": stamp}
    (out / "build.json").write_text(json.dumps(build_record, indent=2), encoding="utf-8")
    print(f"[3/3] model repository: {repository} ({', '.join(TARGET_MODELS['gpu'])})")
    return out


def engines_stamp(config: ModelConfig, settings: BuildSettings, gpu: GpuSettings) -> dict:
    """What the plan and the engines depend on: the checkpoint and the graph's code (export_stamp),
    the settings that shape them, and the toolchain (a plan or engine runs only under the TensorRT
    version that built it). The Triton-side settings do not enter: they only rewrite the repository."""
    import tensorrt
    import tensorrt_llm

    return {
        "export": export_stamp(config.path),
        "settings": {k: getattr(settings, k) for k in sorted(set(PLAN_SETTINGS) | set(ENGINE_SETTINGS))},
        "gpu": {k: getattr(gpu, k) for k in ENGINE_GPU_SETTINGS},
        "tensorrt": tensorrt.__version__,
        "tensorrt_llm": tensorrt_llm.__version__,
    }


def _kv_cache_fraction(gpu: GpuSettings, vision_metadata: dict, engine_dir: Path) -> float:
    """The KV-cache fraction for this machine: lowered where the vision plan shares a GPU with an LLM
    rank (build/gpu_memory.py), from the GPU's size, the built engines' sizes and --llm-runtime-gib."""
    shared = shared_gpus(gpu)
    if not shared:
        return gpu.kv_cache_free_gpu_mem_fraction
    import torch  # the container's; the build runs on the GPUs it deploys to

    total = min(torch.cuda.get_device_properties(i).total_memory for i in shared)
    rank_bytes = max(f.stat().st_size for f in Path(engine_dir).glob("rank*.engine"))
    fraction = kv_cache_fraction(gpu, vision_metadata, total, rank_bytes, int(gpu.llm_runtime_gib * (1 << 30)))
    if fraction < gpu.kv_cache_free_gpu_mem_fraction:
        print(f"      GPU {sorted(shared)} holds the vision plan and an LLM rank: kv_cache_free_gpu_mem_fraction {fraction} (asked {gpu.kv_cache_free_gpu_mem_fraction})")
    return fraction


def check_gpu_build(config: ModelConfig, gpu: GpuSettings) -> None:
    """What the GPU build refuses before any work: Flash checkpoints, LLM families without an engine path."""
    if config.flash is not None:
        raise ValueError(
            "InternVL3.5-Flash (flash_mode) is not built for the GPU path yet: serve it with TARGET=cpu, "
            "or set flash_mode false to serve the plain 256-token path (docs/ARCHITECTURE.md says how the GPU path would route)"
        )
    conversion_plan(config, gpu)


def refuse_gpu_flags(gpu: GpuSettings) -> None:
    """A GPU flag on a CPU build would be ignored silently."""
    default = GpuSettings()
    given = [f"--{f.name.replace('_', '-')}" for f in fields(GpuSettings) if getattr(gpu, f.name) != getattr(default, f.name)]
    if given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --target gpu only (make build TARGET=gpu)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.repository", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (engines, model_repository/, build.json)")
    parser.add_argument("--target", choices=sorted(TARGET_MODELS), default="cpu", help="cpu: ONNX Runtime + python-backend LLM; gpu: TensorRT + TensorRT-LLM (in its container)")
    add_arguments(parser, BuildSettings, title="limits and instances (both targets)")
    add_arguments(parser, GpuSettings, title="GPU target only (--target gpu)")
    args = vars(parser.parse_args())
    model, out, target = args.pop("model"), args.pop("out"), args.pop("target")
    try:
        gpu = from_arguments(GpuSettings, args)
        settings = from_arguments(BuildSettings, args)
        if target == "gpu":
            build_gpu(model, out, settings, gpu)
        else:
            refuse_gpu_flags(gpu)
            build(model, out, settings)
    except (ValueError, RuntimeError) as error:  # ConfigError and ExtractError are ValueErrors
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
