"""KV-cache sizing when the vision plan and an LLM rank share a GPU (the default placement: GPU 0).

An LLM rank (TensorRT-LLM's cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp, the
TrtGptModelInflightBatching constructor; read at the search index's NVIDIA/TensorRT-LLM commits
00825c4 and b35ac1b, not at the v1.2.1 tag, which was not readable) allocates, in order: its engine
(weights ≈ the rank's engine file), the engine's execution context (TllmRuntime:
ICudaEngine::getDeviceMemorySizeV2, the activation memory), the custom all-reduce workspace under TP,
its runtime buffers (createBuffers, among them the prompt-table buffer of
max_prompt_embedding_table_size × hidden size) and the decoder's; only then does
BaseKVCacheManager::calculateFreeMemBytes (kvCacheManager.cpp) read the free memory (cudaMemGetInfo
plus the memory pool's free bytes) and give the KV cache `kv_cache_free_gpu_mem_fraction` × that.
Triton loads the models in parallel, so the vision plan — per instance its weights (the plan file) and
its execution context at the profile max, plus a CUDA context and workspaces — comes before or after.

With T the GPU's memory, E the rank's engine, R its runtime allocations (everything above but the
engine), V the vision plan's need and φ the fraction:

    plan after the KV cache:  free seen = T − E − R;      what the KV cache leaves, (1 − φ)(T − E − R),
                              must hold V                 ⇒  φ ≤ 1 − V / (T − E − R)
    plan before:              free seen = T − E − R − V;  the plan is already resident, and the KV cache
                              leaves (1 − φ)(T − E − R − V) ≥ 0 for any φ < 1: no constraint

So the plan-after order binds: φ = min(requested, 1 − V / (T − E − R)), floored to 3 decimals (rounding
up could leave the plan a few MiB short). Below MIN_FRACTION the two do not fit sensibly on one GPU.
R is not known at build time (the engine is not loaded then): it is the `--llm-runtime-gib` setting,
an estimate the first start's log corrects (docs/GPU.md, Memory sizing).
"""

from __future__ import annotations

import math

from build.settings import GpuSettings

VISION_MARGIN_BYTES = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces of the vision instances
MIN_FRACTION = 0.1


def llm_gpu_ids(gpu: GpuSettings) -> tuple[int, ...]:
    """The GPUs of the LLM ranks: --llm-gpus, else the first world_size visible ones (rank order)."""
    return gpu.llm_gpus or tuple(range(gpu.world_size))


def shared_gpus(gpu: GpuSettings) -> set[int]:
    return set(gpu.vision_gpus) & set(llm_gpu_ids(gpu))


def vision_bytes(vision_metadata: dict, instances: int) -> int:
    """What the vision instances on one GPU hold: plan weights and execution context, each instance."""
    memory = vision_metadata.get("memory")
    if not memory:
        raise ValueError("the vision plan's metadata has no memory sizes (built by an older version): rebuild it")
    return instances * (memory["plan_bytes"] + memory["device_memory_bytes"]) + VISION_MARGIN_BYTES


def kv_cache_fraction(
    gpu: GpuSettings, vision_metadata: dict, gpu_total_bytes: int, llm_rank_bytes: int, llm_runtime_bytes: int
) -> float:
    """The kv_cache_free_gpu_mem_fraction to configure: the requested one, lowered when a GPU holds both.
    llm_rank_bytes: the rank's engine file; llm_runtime_bytes: what the rank allocates besides it before
    its KV-cache manager reads the free memory."""
    requested = gpu.kv_cache_free_gpu_mem_fraction
    shared = shared_gpus(gpu)
    if not shared:
        return requested
    need = vision_bytes(vision_metadata, gpu.vision_instances)
    free = gpu_total_bytes - llm_rank_bytes - llm_runtime_bytes
    bound = 1 - need / free if free > 0 else 0.0
    if bound < MIN_FRACTION:
        gib = 1 << 30
        raise ValueError(
            f"GPU {min(shared)} would hold an LLM rank ({llm_rank_bytes / gib:.1f} GiB of engine, "
            f"{llm_runtime_bytes / gib:.1f} GiB of runtime buffers) and the vision plan ({need / gib:.1f} GiB with "
            f"its activations at the profile max) of its {gpu_total_bytes / gib:.1f} GiB, leaving the KV cache under "
            f"{MIN_FRACTION:.0%} of the rest: place the vision plan on another GPU (--vision-gpus), or lower "
            "--max-batch-size (the plan's profile max)"
        )
    return min(requested, math.floor(bound * 1000) / 1000)
