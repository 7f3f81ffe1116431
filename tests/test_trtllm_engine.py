"""build/trtllm_engine.py on CPU: the BuildConfig it asks for, the per-rank conversion plan and the
refusals; the engine build itself is a `gpu` test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from build.llm_checkpoint import ExtractError
from build.settings import BuildSettings, GpuSettings
from build.trtllm_engine import build_config_dict, build_llm_engine, conversion_plan, model_class_name
from engine.config import ModelConfig

# tensorrt_llm/builder.py BuildConfig fields (1.1/1.2 line, the dataclass read for build/trtllm_engine.py)
BUILD_CONFIG_FIELDS = {
    "max_input_len", "max_seq_len", "opt_batch_size", "max_batch_size", "max_beam_width", "max_num_tokens",
    "opt_num_tokens", "max_prompt_embedding_table_size", "kv_cache_type", "gather_context_logits",
    "gather_generation_logits", "strongly_typed", "force_num_profiles", "profiling_verbosity",
    "enable_debug_output", "max_draft_len", "speculative_decoding_mode", "use_refit", "input_timing_cache",
    "output_timing_cache", "lora_config", "weight_sparsity", "weight_streaming", "plugin_config",
    "use_strip_plan", "max_encoder_input_len", "dry_run", "visualize_network", "monitor_memory", "use_mrope",
}  # fmt: skip
# tensorrt_llm/plugin/plugin.py PluginConfig fields this build sets (trtllm-build's --<name> flags)
PLUGIN_FIELDS = {"gpt_attention_plugin", "gemm_plugin", "remove_input_padding", "context_fmha", "use_paged_context_fmha"}


def test_build_config_carries_the_limits_from_the_config_object(checkpoints, tmp_path):
    config = ModelConfig.from_pretrained(checkpoints["qwen2"])
    settings = BuildSettings(max_images=2, llm_max_batch_size=3, max_num_tokens=1024, text_budget=512, max_output_len=256)
    built = build_config_dict(config, settings, tmp_path)
    assert set(built) <= BUILD_CONFIG_FIELDS and set(built["plugin_config"]) == PLUGIN_FIELDS
    q, per_request = config.vision.tokens_per_tile, 2 * config.max_tiles_per_image
    assert built["max_batch_size"] == 3
    assert built["max_prompt_embedding_table_size"] == 3 * per_request * q  # every sequence in flight may carry a full request's images
    assert built["max_input_len"] == min(per_request * q + 512, config.text.max_position_embeddings - 1)
    assert built["max_seq_len"] == min(built["max_input_len"] + 256, config.text.max_position_embeddings)
    assert built["max_num_tokens"] == 1024 and built["kv_cache_type"] == "paged"
    assert built["plugin_config"]["use_paged_context_fmha"]  # chunked prefill + KV reuse


def test_defect_the_engine_build_writes_its_timing_cache_under_the_output_directory(checkpoints, tmp_path, monkeypatch):
    """BuildConfig's default output_timing_cache is the relative 'model.cache' (tensorrt_llm/builder.py):
    the build would write into (and assert it can write) whatever directory it runs in."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "llm"
    built = build_config_dict(ModelConfig.from_pretrained(checkpoints["qwen2"]), BuildSettings(), out)
    for key in ("input_timing_cache", "output_timing_cache"):
        assert Path(built[key]).is_absolute() and Path(built[key]).parent == out.resolve(), key


@pytest.mark.parametrize("family, model_class", [("qwen2", "QWenForCausalLM"), ("qwen3", "QWenForCausalLM"), ("llama", "LLaMAForCausalLM")])
def test_conversion_plan_has_one_mapping_per_rank(checkpoints, family, model_class):
    config = ModelConfig.from_pretrained(checkpoints[family])
    plan = conversion_plan(config, GpuSettings(dtype="bfloat16", tp_size=2, pp_size=2, quantization="int4_weight_only"))
    assert plan["model_class"] == model_class and plan["dtype"] == "bfloat16"
    assert (plan["quant_algo"], plan["kv_cache_quant_algo"]) == ("W4A16", None)
    assert plan["mappings"] == [{"world_size": 4, "rank": r, "tp_size": 2, "pp_size": 2} for r in range(4)]
    assert conversion_plan(config, GpuSettings(quantization="fp8"))[("kv_cache_quant_algo")] == "FP8"


def test_families_without_an_engine_path_are_refused_by_name():
    with pytest.raises(ExtractError, match="gpt_oss.*PyTorch backend"):
        model_class_name("gpt_oss")
    assert model_class_name("internlm2") == "LLaMAForCausalLM"  # extracted as the Llama it computes
    with pytest.raises(ExtractError, match="unknown"):
        model_class_name("mamba")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is not None, reason="tensorrt_llm is installed here")
def test_without_tensorrt_llm_the_build_says_where_to_run_it(tiny, tmp_path):
    with pytest.raises(RuntimeError, match="tensorrt_llm is not installed.*container"):
        build_llm_engine(tiny, tmp_path, BuildSettings(), GpuSettings())
    assert not (tmp_path / "hf").exists()  # refused before extracting anything


@pytest.mark.gpu
def test_engine_reads_the_prompt_table_like_the_cpu_engine(tiny, tmp_path):
    """The tiny qwen3 engine's first greedy token for a prompt with image slots equals the CPU
    engine's (fp16 vs fp32: only the first token is compared; later ones may diverge on ties)."""
    import torch
    from tensorrt_llm.runtime import ModelRunner

    from engine.llm.engine import LLMEngine
    from engine.llm.model import DecoderLM
    from engine.sampling_params import SamplingParams

    config = ModelConfig.from_pretrained(tiny)
    engine_dir = build_llm_engine(tiny, tmp_path, BuildSettings(max_images=1, llm_max_batch_size=1), GpuSettings())
    q, h, vocab = config.vision.tokens_per_tile, config.text.hidden_size, config.text.vocab_size
    table = np.random.default_rng(0).standard_normal((q, h)).astype(np.float32) * 0.02
    ids = np.array([1, 2, *range(vocab, vocab + q), 3], np.int32)
    runner = ModelRunner.from_dir(str(engine_dir))
    out = runner.generate(
        [torch.from_numpy(ids)], max_new_tokens=1, end_id=config.stop_token_id, pad_id=config.stop_token_id,
        prompt_table=torch.from_numpy(table).half().cuda()[None], prompt_tasks="0", return_dict=True,
    )  # fmt: skip
    gpu_token = int(out["output_ids"][0, 0, len(ids)])
    cpu = LLMEngine(DecoderLM.from_pretrained(tiny, config.text), config.stop_token_id, max_batch_size=1, max_num_tokens=2048)
    cpu.add_request("r", ids, table, SamplingParams(max_new_tokens=1))
    tokens = [e.token_id for _ in range(4) for e in cpu.step() if e.token_id is not None]
    assert tokens[0] == gpu_token
