"""The vision plan and an LLM rank on one GPU (the default placement). The tensorrtllm backend gives the
KV cache kv_cache_free_gpu_mem_fraction × the memory free when its KV-cache manager reads it, after the
engine, its execution context and its runtime buffers are allocated (TensorRT-LLM
cpp/tensorrt_llm/batch_manager/trtGptModelInflightBatching.cpp, kvCacheManager.cpp); the vision plan,
loaded in parallel, may come before or after that. build/gpu_memory.py lowers the fraction so the plan
fits in either order. Every expected number below is worked by hand in its comment."""

from __future__ import annotations

import pytest

from build.gpu_memory import kv_cache_fraction, shared_gpus
from build.settings import GpuSettings

GIB = 1 << 30
# an InternViT-6B fp16 plan: 11 GiB of weights, 6 GiB of activations at its profile max; with the 1 GiB
# margin for its CUDA context and workspaces it needs 11 + 6 + 1 = 18 GiB
VISION = {"memory": {"plan_bytes": 11 * GIB, "device_memory_bytes": 6 * GIB}}


def test_the_fraction_leaves_the_plan_room_when_it_loads_after_the_kv_cache():
    """A 38B-class rank at TP 2 on an 80 GiB GPU: 33 GiB of engine, 3 GiB of runtime buffers.
    Plan loads last: the KV manager sees 80 − 33 − 3 = 44 GiB free and must leave 18 of them:
    fraction ≤ 1 − 18/44 = 26/44 = 0.5909…, floored to 0.590 (rounding up to 0.591 would leave
    0.409 × 44 = 17.996 GiB, short of 18). The old bound, free = 80 − 33 = 47 GiB, gave
    1 − 18/47 = 0.617, which leaves (1 − 0.617) × 44 = 16.85 GiB: 1.15 GiB short of the plan."""
    gpu = GpuSettings(tp_size=2)  # vision on GPU 0, ranks on the first two GPUs: GPU 0 holds both
    assert shared_gpus(gpu) == {0}
    assert kv_cache_fraction(gpu, VISION, 80 * GIB, 33 * GIB, 3 * GIB) == 0.590


def test_the_fraction_fits_in_either_load_order():
    """With 0.590 from above. Plan last: 33 + 3 + 0.590 × 44 (= 25.96) + 18 = 79.96 GiB ≤ 80.
    Plan first: the KV manager sees 80 − 33 − 3 − 18 = 26 GiB, takes 0.590 × 26 = 15.34:
    33 + 3 + 18 + 15.34 = 69.34 GiB ≤ 80. The plan-last order is the one that binds."""
    fraction = kv_cache_fraction(GpuSettings(tp_size=2), VISION, 80 * GIB, 33 * GIB, 3 * GIB)
    assert 33 + 3 + fraction * (80 - 33 - 3) + 18 <= 80
    assert 33 + 3 + 18 + fraction * (80 - 33 - 3 - 18) <= 80


def test_instances_multiply_the_plan_and_separate_gpus_keep_the_requested_fraction():
    """80 GiB GPU, 20 GiB engine, 3 GiB runtime: 57 GiB seen free.
    One instance: 1 − 18/57 = 39/57 = 0.6842… → 0.684. Two: need 2 × (11 + 6) + 1 = 35 GiB,
    1 − 35/57 = 22/57 = 0.3859… → 0.385."""
    assert kv_cache_fraction(GpuSettings(), VISION, 80 * GIB, 20 * GIB, 3 * GIB) == 0.684
    assert kv_cache_fraction(GpuSettings(vision_instances=2), VISION, 80 * GIB, 20 * GIB, 3 * GIB) == 0.385
    apart = GpuSettings(tp_size=2, vision_gpus=(0,), llm_gpus=(1, 2), kv_cache_free_gpu_mem_fraction=0.9)
    assert not shared_gpus(apart) and kv_cache_fraction(apart, {}, 0, 0, 0) == 0.9


def test_a_requested_fraction_below_the_bound_is_kept():
    """80 GiB GPU, 10 GiB engine, 2 GiB runtime: 1 − 18/68 = 50/68 = 0.735… > the 0.5 asked."""
    assert kv_cache_fraction(GpuSettings(kv_cache_free_gpu_mem_fraction=0.5), VISION, 80 * GIB, 10 * GIB, 2 * GIB) == 0.5


def test_a_gpu_too_small_for_both_is_refused_counting_the_runtime_buffers():
    """40 GiB GPU, 18 GiB engine, 3 GiB runtime: 19 GiB seen free, 1 − 18/19 = 0.053 < 10 % → refused
    (without the runtime buffers it was 1 − 18/22 = 0.18 and passed)."""
    with pytest.raises(ValueError, match="--vision-gpus"):
        kv_cache_fraction(GpuSettings(), VISION, 40 * GIB, 18 * GIB, 3 * GIB)
    with pytest.raises(ValueError, match="--vision-gpus"):  # 40 − 20 − 3 = 17 GiB: not even the plan fits
        kv_cache_fraction(GpuSettings(), VISION, 40 * GIB, 20 * GIB, 3 * GIB)
    with pytest.raises(ValueError, match="rebuild"):
        kv_cache_fraction(GpuSettings(), {"memory": None}, 80 * GIB, 20 * GIB, 3 * GIB)
