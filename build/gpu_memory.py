"""KV-cache sizing when the vision plan and an LLM rank share a GPU (the default placement: GPU 0).

The tensorrtllm backend sizes the paged KV cache as `kv_cache_free_gpu_mem_fraction` × the GPU memory
free when its KV-cache manager is created, after the engine has loaded (cpp/tensorrt_llm/batch_manager/
kvCacheManager.cpp; with `max_tokens_in_paged_kv_cache` also set, the smaller wins). Triton loads the
models in parallel, so the LLM may take its share before the vision plan has allocated anything; the
plan then needs, per instance, its weights (the plan file) and its execution context at the profile
max (ICudaEngine.device_memory_size_v2, TensorRT 10), plus a CUDA context and library workspaces.
So on a shared GPU:

    free  ≥ total − LLM rank engine            (memory the KV manager sees at most)
    need  = instances × (plan bytes + context bytes) + margin
    (1 − fraction) × free ≥ need   ⇒   fraction ≤ 1 − need / free

and the requested fraction is lowered to that bound (it is the binding case: a smaller `free` only
shrinks the KV cache with it). Below MIN_FRACTION the two do not fit sensibly on one GPU.
"""

from __future__ import annotations

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


def kv_cache_fraction(gpu: GpuSettings, vision_metadata: dict, gpu_total_bytes: int, llm_rank_bytes: int) -> float:
    """The kv_cache_free_gpu_mem_fraction to configure: the requested one, lowered when a GPU holds both."""
    requested = gpu.kv_cache_free_gpu_mem_fraction
    shared = shared_gpus(gpu)
    if not shared:
        return requested
    need = vision_bytes(vision_metadata, gpu.vision_instances)
    free = gpu_total_bytes - llm_rank_bytes
    bound = 1 - need / free if free > 0 else 0.0
    if bound < MIN_FRACTION:
        gib = 1 << 30
        raise ValueError(
            f"GPU {min(shared)} would hold an LLM rank ({llm_rank_bytes / gib:.1f} GiB) and the vision plan "
            f"({need / gib:.1f} GiB with its activations at the profile max) of its {gpu_total_bytes / gib:.1f} GiB, "
            f"leaving the KV cache under {MIN_FRACTION:.0%} of the rest: place the vision plan on another GPU "
            "(--vision-gpus), or lower --max-batch-size (the plan's profile max)"
        )
    return round(min(requested, bound), 3)
