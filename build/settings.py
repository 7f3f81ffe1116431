"""Deployment settings and every limit derived from them and the checkpoint's ModelConfig.

`BuildSettings` applies to both targets; `GpuSettings` only to `make build TARGET=gpu`. The limits
are computed here once and written into the Triton configs, the TensorRT profile and the
TensorRT-LLM BuildConfig, so the three can never disagree.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from engine.config import ModelConfig

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
GPU_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class BuildSettings:
    max_images: int = 4  # images per request
    max_batch_size: int = 8  # requests per Triton batch (the batch dimension of every model)
    llm_max_batch_size: int = 8  # sequences decoding together (in-flight batching)
    max_num_tokens: int = 2048  # tokens per engine step (bounds how long a prefill stalls decodes)
    text_budget: int = 2048  # prompt tokens beyond the image tokens
    max_output_len: int = 4096  # generated tokens per request the GPU engine is built for
    preprocess_instances: int = 2
    vision_queue_delay_us: int = 0  # requests arriving during a run still batch; waiting only adds TTFT

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value < (0 if f.name == "vision_queue_delay_us" else 1):
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
    dtype: str = "float16"  # both engines; the prompt table crosses between them in this dtype
    tp_size: int = 1
    pp_size: int = 1
    quantization: str = "none"  # LLM weights: int8/int4 weight-only (Ampere–Hopper), fp8 (Hopper+)
    vision_gpus: tuple[int, ...] = (0,)  # GPUs that each run vision_instances copies of the plan
    vision_instances: int = 1
    llm_gpus: tuple[int, ...] = ()  # one per TP×PP rank; empty: the backend uses the visible GPUs
    kv_cache_free_gpu_mem_fraction: float = 0.85  # of the memory left after the engines load
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_kv_cache_reuse: bool = True  # prompt_table_extra_ids keep different images apart

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
        if not 0 < self.kv_cache_free_gpu_mem_fraction < 1:
            raise ValueError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1), got {self.kv_cache_free_gpu_mem_fraction}")

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


_CHOICES = {"dtype": GPU_DTYPES, "quantization": QUANTIZATIONS, "batch_scheduler_policy": SCHEDULER_POLICIES}


def add_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One --flag per field of a settings dataclass (GPU id lists as comma-separated values)."""
    defaults = settings_class()
    for f in fields(settings_class):
        flag, default = f"--{f.name.replace('_', '-')}", getattr(defaults, f.name)
        if isinstance(default, tuple):
            parser.add_argument(flag, type=_gpu_ids, default=default, help="comma-separated GPU ids")
        elif isinstance(default, bool):
            parser.add_argument(flag, type=_boolean, default=default, help="true or false")
        else:
            parser.add_argument(flag, type=type(default), default=default, choices=_CHOICES.get(f.name))


def from_arguments(settings_class: type, args: dict):
    """The settings dataclass from parsed arguments; its fields are popped from `args`."""
    return settings_class(**{f.name: args.pop(f.name) for f in fields(settings_class)})


def _gpu_ids(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")
