"""Issue 12, defect 5: the vision plan and an LLM rank on one GPU (the default placement). The tensorrtllm
backend gives the KV cache kv_cache_free_gpu_mem_fraction of the memory free when its KV-cache manager
is created, after the engine loads (cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp); the vision plan,
loaded in parallel, may come after it. build/gpu_memory.py lowers the fraction so the plan still fits."""

from __future__ import annotations

import pytest

from build.gpu_memory import VISION_MARGIN_BYTES, kv_cache_fraction, shared_gpus
from build.settings import GpuSettings

GIB = 1 << 30
# a 38B-class deployment at TP 2 on 80 GB GPUs: 33 GiB of LLM engine per rank, an InternViT-6B fp16 plan
# (11 GiB of weights) with 6 GiB of activations at its profile max
VISION = {"memory": {"plan_bytes": 11 * GIB, "device_memory_bytes": 6 * GIB}}


def test_defect_the_default_placement_shares_gpu_0_and_the_fraction_leaves_the_plan_its_memory():
    gpu = GpuSettings(tp_size=2)  # vision on GPU 0, ranks on the first two GPUs: GPU 0 holds both
    assert shared_gpus(gpu) == {0}
    total, rank = 80 * GIB, 33 * GIB
    fraction = kv_cache_fraction(gpu, VISION, total, rank)
    assert fraction < gpu.kv_cache_free_gpu_mem_fraction  # 0.85 would leave 7 GiB: less than the plan's 18
    free = total - rank
    need = 11 * GIB + 6 * GIB + VISION_MARGIN_BYTES
    assert (1 - fraction) * free >= need - 0.001 * free  # rounded to 3 decimals
    assert (1 - gpu.kv_cache_free_gpu_mem_fraction) * free < need


def test_instances_multiply_the_plan_and_separate_gpus_keep_the_requested_fraction():
    one = kv_cache_fraction(GpuSettings(), VISION, 80 * GIB, 20 * GIB)
    two = kv_cache_fraction(GpuSettings(vision_instances=2), VISION, 80 * GIB, 20 * GIB)
    assert two < one
    apart = GpuSettings(tp_size=2, vision_gpus=(0,), llm_gpus=(1, 2), kv_cache_free_gpu_mem_fraction=0.9)
    assert not shared_gpus(apart) and kv_cache_fraction(apart, {}, 0, 0) == 0.9


def test_a_gpu_too_small_for_both_is_refused_naming_the_way_out():
    with pytest.raises(ValueError, match="--vision-gpus"):
        kv_cache_fraction(GpuSettings(), VISION, 40 * GIB, 20 * GIB)
    with pytest.raises(ValueError, match="rebuild"):
        kv_cache_fraction(GpuSettings(), {"memory": None}, 80 * GIB, 20 * GIB)
