"""Deployment settings and every limit derived from them and the checkpoint's ModelConfig.

`BuildSettings` applies to both targets; `GpuSettings` only to `make build TARGET=gpu`. The limits
are computed here once and written into the Triton configs, the TensorRT profile and the
TensorRT-LLM BuildConfig, so the three can never disagree.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from engine.config import ModelConfig
from engine.vision_precision import VISION_PRECISIONS, check_vision_precision

# --quantization -> (quant_algo, kv_cache_quant_algo): names of tensorrt_llm.quantization.QuantAlgo
# (examples/models/core/qwen/convert_checkpoint.py: weight-only int8 -> W8A16, int4 -> W4A16)
QUANT_ALGOS = {
    "none": (None, None),
    "int8_weight_only": ("W8A16", None),
    "int4_weight_only": ("W4A16", None),
    "fp8": ("FP8", "FP8"),  # weights, activations and KV cache; Hopper and newer
}
QUANTIZATIONS = tuple(QUANT_ALGOS)
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
LLM_WEIGHTS = ("float32", "float16", "int8")  # engine/llm/precision.py accepts the same (kept torch-free here)
GPU_DTYPES = ("float16", "bfloat16")


def _setting(default, help: str):
    """A settings field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BuildSettings:
    max_images: int = _setting(4, "images per request")
    max_batch_size: int = _setting(8, "requests per Triton batch (the batch dimension of every model; requests per vision run)")
    llm_max_batch_size: int = _setting(8, "sequences decoding together (in-flight batching)")
    max_num_tokens: int = _setting(2048, "tokens per engine step (bounds how long a prefill stalls decodes)")
    text_budget: int = _setting(2048, "prompt tokens beyond the image tokens")
    max_output_len: int = _setting(4096, "generated tokens per request beyond the longest prompt (max_seq_len = max_input_len + this)")
    max_image_pixels: int = _setting(40_000_000, "pixels per image (width × height, read from the header before decoding)")
    max_request_bytes: int = _setting(64 * 2**20, "encoded image (or video) bytes per request")
    max_video_frames: int = _setting(32, "frames sampled from a request's video (num_frames); frames × tiles per frame share the request's tiles")
    max_video_seconds: float = _setting(600.0, "length of a request's video (its frames / fps)")
    max_video_pixels: int = _setting(3840 * 2160, "pixels per video frame (width × height, read from the header before decoding)")
    preprocess_instances: int = _setting(2, "preprocess model instances (CPU processes)")
    vision_cache_mib: int = _setting(256, "CPU vision model: MiB of projected image features kept by content key (0: off)")
    vision_queue_delay_us: int = _setting(0, "vision dynamic-batching delay; requests arriving during a run still batch, waiting only adds TTFT")
    prefix_cache_mib: int = _setting(1024, "CPU LLM: MiB of K/V kept for prefix reuse across requests (0: off)")
    llm_weights: str = _setting(
        "float32", "CPU LLM: stored weight precision, activations fp32 (float16 halves the bytes read per token, int8 quarters them)"
    )
    vision_precision: str = _setting(
        "float32", "CPU vision encoder: ONNX graph precision (int8: dynamic quantization of its MatMul weights, faster per tile; docs/PERFORMANCE.md)"
    )

    def __post_init__(self):
        if self.llm_weights not in LLM_WEIGHTS:
            raise ValueError(f"llm_weights must be one of {LLM_WEIGHTS}, got {self.llm_weights!r}")
        check_vision_precision(self.vision_precision)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                continue
            if value < (0 if f.name in ("vision_queue_delay_us", "prefix_cache_mib", "vision_cache_mib") else 1):
                raise ValueError(f"{f.name} must be positive, got {value}")

    def limits(self, config: ModelConfig) -> dict[str, int]:
        q = config.vision.tokens_per_tile
        max_tiles = self.max_images * config.max_tiles_per_image
        positions = config.text.max_position_embeddings
        max_input_len = min(max_tiles * q + self.text_budget, positions - 1)
        return {
            "max_tiles_per_request": max_tiles,
            "max_input_len": max_input_len,
            "max_seq_len": min(max_input_len + self.max_output_len, positions),
            # one vision run takes a whole Triton batch of requests (ragged tiles)
            "vision_max_tiles_per_run": self.max_batch_size * max_tiles,
            # prompt-table rows in flight: every in-flight sequence may carry a full request's images
            # (TensorRT-LLM's multimodal README: max_batch_size × visual features × images)
            "max_multimodal_len": self.llm_max_batch_size * max_tiles * q,
        }


@dataclass(frozen=True)
class GpuSettings:
    dtype: str = _setting("float16", "both engines; the prompt table crosses between them in this dtype")
    tp_size: int = _setting(1, "TensorRT-LLM tensor-parallel ranks")
    pp_size: int = _setting(1, "TensorRT-LLM pipeline-parallel ranks")
    quantization: str = _setting("none", "LLM weights: int8/int4 weight-only (Ampere–Hopper), fp8 (Hopper+)")
    vision_gpus: tuple[int, ...] = _setting((0,), "comma-separated GPU ids that each run --vision-instances copies of the plan")
    vision_instances: int = _setting(1, "vision plan instances per listed GPU")
    llm_gpus: tuple[int, ...] = _setting((), "comma-separated GPU ids, one per TP×PP rank (default: the visible GPUs in order)")
    kv_cache_free_gpu_mem_fraction: float = _setting(0.85, "KV-cache share of the GPU memory left after the engines load")
    llm_runtime_gib: float = _setting(
        3.0,
        "GiB an LLM rank allocates besides its engine before sizing its KV cache (execution context, runtime and "
        "decoder buffers): an estimate, used where the vision plan shares the GPU (docs/GPU.md, Memory sizing)",
    )
    batch_scheduler_policy: str = _setting("guaranteed_no_evict", "tensorrt_llm batch scheduler")
    enable_kv_cache_reuse: bool = _setting(True, "true or false; prompt_table_extra_ids keep different images apart")

    def __post_init__(self):
        if self.dtype not in GPU_DTYPES:
            raise ValueError(f"dtype must be one of {GPU_DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise ValueError(f"batch_scheduler_policy must be one of {SCHEDULER_POLICIES}, got {self.batch_scheduler_policy!r}")
        if self.tp_size < 1 or self.pp_size < 1 or self.vision_instances < 1:
            raise ValueError("tp_size, pp_size and vision_instances must be ≥ 1")
        if not self.vision_gpus or min(self.vision_gpus) < 0:
            raise ValueError(f"vision_gpus must list GPU ids, got {self.vision_gpus}")
        if self.llm_gpus and len(self.llm_gpus) != self.world_size:
            raise ValueError(
                f"llm_gpus lists {len(self.llm_gpus)} GPUs but tp_size × pp_size = {self.world_size}: one GPU per rank"
            )
        if len(set(self.llm_gpus)) != len(self.llm_gpus):
            raise ValueError(f"llm_gpus repeats a GPU: {self.llm_gpus}")
        if self.llm_runtime_gib < 0:
            raise ValueError(f"llm_runtime_gib must be ≥ 0, got {self.llm_runtime_gib}")
        if not 0 < self.kv_cache_free_gpu_mem_fraction < 1:
            raise ValueError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1), got {self.kv_cache_free_gpu_mem_fraction}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


_CHOICES = {"llm_weights": LLM_WEIGHTS, "vision_precision": VISION_PRECISIONS, "dtype": GPU_DTYPES, "quantization": QUANTIZATIONS, "batch_scheduler_policy": SCHEDULER_POLICIES}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, except flags without one (required, switches) and
    those whose help says what the default means."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser, settings_class: type, only: tuple[str, ...] | None = None, title: str | None = None) -> None:
    """One --flag per field of a settings dataclass, or per field named in `only` (what the tool
    reads; the others keep their defaults). GPU id lists are comma-separated values."""
    group = parser.add_argument_group(title) if title else parser
    defaults = settings_class()
    for f in fields(settings_class):
        if only is not None and f.name not in only:
            continue
        flag, default, help = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name), f.metadata["help"]
        if isinstance(default, tuple):  # a string default goes through type= and shows as typed
            group.add_argument(flag, type=_gpu_ids, default=",".join(map(str, default)), help=help)
        elif isinstance(default, bool):
            group.add_argument(flag, type=_boolean, default=str(default).lower(), help=help)
        else:
            group.add_argument(flag, type=type(default), default=default, choices=_CHOICES.get(f.name), help=help)


def from_arguments(settings_class: type, args: dict):
    """The settings dataclass from parsed arguments; its fields present in `args` are popped."""
    return settings_class(**{f.name: args.pop(f.name) for f in fields(settings_class) if f.name in args})


def _gpu_ids(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")
