"""Build the language model's TensorRT-LLM engine with a prompt table (GPU path; needs CUDA and
tensorrt_llm 1.2.1, i.e. the NGC `tritonserver:26.04-trtllm-python-py3` container).

    python -m build.trtllm_engine --model <internvl checkpoint> --out <dir> [--dtype float16]
        [--tp-size 1] [--pp-size 1] [--quantization none|int8_weight_only|int4_weight_only|fp8]
        [BuildSettings flags: --max-images 4 --llm-max-batch-size 8 --max-num-tokens 2048 ...]

1. build.llm_checkpoint extracts the language model as an HF causal-LM checkpoint (<dir>/hf);
2. per rank r of TP×PP: <Family>ForCausalLM.from_hugging_face(hf, dtype, Mapping(...), QuantConfig)
   (fp8: <Family>.quantize → ModelOpt calibration → from_checkpoint);
3. tensorrt_llm.builder.build(model, BuildConfig.from_dict(...)) and Engine.save(<dir>/engine),
   which writes rank<r>.engine and config.json — the directory the tensorrt_llm Triton model loads.

API followed (TensorRT-LLM 1.1/1.2 sources; the v1.2.1 tag is not in the index we read):
tensorrt_llm/builder.py (BuildConfig fields, BuildConfig.from_dict with a plugin_config dict,
build(model, build_config) -> Engine, Engine.save), tensorrt_llm/models/llama/model.py and
qwen/model.py (from_hugging_face(hf_model_or_dir, dtype, mapping, quant_config), quantize(...)),
tensorrt_llm/models/modeling_utils.py (QuantConfig, PretrainedModel.from_checkpoint),
examples/models/core/qwen/convert_checkpoint.py (weight-only int8 -> W8A16, int4 -> W4A16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from build.gpu_toolchain import check_version
from build.llm_checkpoint import extract_llm_checkpoint, trtllm_support
from build.settings import QUANT_ALGOS, BuildSettings, GpuSettings, HelpFormatter, add_arguments, from_arguments
from engine.config import ModelConfig

ENGINE_DIR, HF_DIR, TIMING_CACHE = "engine", "hf", "timing.cache"


def model_class_name(model_type: str) -> str:
    """The tensorrt_llm.models class that converts this family; ExtractError when there is none."""
    return trtllm_support(model_type).converter.removeprefix("tensorrt_llm.models.").split(".")[0]


def build_config_dict(config: ModelConfig, settings: BuildSettings, out: Path) -> dict:
    """BuildConfig.from_dict input: the engine's limits, all from the checkpoint config + settings;
    the timing cache under `out` (read if present, written by rank 0)."""
    limits = settings.limits(config)
    # BuildConfig's own default output_timing_cache is the relative 'model.cache' (tensorrt_llm/builder.py),
    # written into whatever directory the build runs in, and asserted writable after the engine is built
    timing_cache = str((Path(out) / TIMING_CACHE).resolve())
    return {
        "input_timing_cache": timing_cache,
        "output_timing_cache": timing_cache,
        "max_batch_size": settings.llm_max_batch_size,
        "max_input_len": limits["max_input_len"],
        "max_seq_len": limits["max_seq_len"],
        "max_num_tokens": settings.max_num_tokens,
        "max_beam_width": 1,
        "max_prompt_embedding_table_size": limits["max_multimodal_len"],  # > 0 turns the prompt table on
        "kv_cache_type": "paged",
        "strongly_typed": True,
        "plugin_config": {
            "gpt_attention_plugin": "auto",
            "gemm_plugin": "auto",
            "remove_input_padding": True,
            "context_fmha": True,
            # chunked prefill (max_num_tokens < max_input_len) and KV-cache reuse both need it
            "use_paged_context_fmha": True,
        },
    }


def conversion_plan(config: ModelConfig, gpu: GpuSettings) -> dict:
    """What step 2 does, as data: the class, dtype, quantization and one Mapping per rank."""
    quant_algo, kv_cache_quant_algo = QUANT_ALGOS[gpu.quantization]
    return {
        "model_class": model_class_name(config.text.model_type),
        "dtype": gpu.dtype,
        "quant_algo": quant_algo,
        "kv_cache_quant_algo": kv_cache_quant_algo,
        "mappings": [
            {"world_size": gpu.world_size, "rank": rank, "tp_size": gpu.tp_size, "pp_size": gpu.pp_size}
            for rank in range(gpu.world_size)
        ],
    }


def build_llm_engine(checkpoint: str | Path, out: str | Path, settings: BuildSettings, gpu: GpuSettings) -> Path:
    """-> <out>/engine (rank<r>.engine + config.json). Needs tensorrt_llm and a GPU per rank's build."""
    config = ModelConfig.from_pretrained(checkpoint)
    plan = conversion_plan(config, gpu)  # refuses unsupported families before anything heavy
    try:
        import tensorrt_llm
        from tensorrt_llm import BuildConfig, Mapping, models
        from tensorrt_llm.builder import build
        from tensorrt_llm.models.modeling_utils import QuantConfig
        from tensorrt_llm.quantization import QuantAlgo
    except ImportError as e:
        raise RuntimeError(
            "tensorrt_llm is not installed: build the GPU path inside the TensorRT-LLM Triton container (docs/GPU.md)"
        ) from e
    check_version("tensorrt_llm", tensorrt_llm.__version__)
    out = Path(out)
    hf_dir = extract_llm_checkpoint(checkpoint, out / HF_DIR)
    engine_dir = out / ENGINE_DIR
    model_class = getattr(models, plan["model_class"])
    quant_config = None
    if plan["quant_algo"]:
        kv = plan["kv_cache_quant_algo"]
        quant_config = QuantConfig(quant_algo=QuantAlgo[plan["quant_algo"]], kv_cache_quant_algo=kv and QuantAlgo[kv])
    build_config = build_config_dict(config, settings, out)
    quantized_dir = out / "quantized"
    if gpu.quantization == "fp8":  # calibrated scales: ModelOpt writes a TensorRT-LLM checkpoint for all ranks
        model_class.quantize(
            str(hf_dir), str(quantized_dir), dtype=plan["dtype"], mapping=Mapping(**plan["mappings"][0]), quant_config=quant_config
        )
    for mapping in plan["mappings"]:
        if gpu.quantization == "fp8":
            model = model_class.from_checkpoint(str(quantized_dir), rank=mapping["rank"])
        else:
            model = model_class.from_hugging_face(
                str(hf_dir), plan["dtype"], mapping=Mapping(**mapping), quant_config=quant_config
            )
        engine = build(model, BuildConfig.from_dict(build_config))  # from_dict copies its input
        engine.save(str(engine_dir))
    (out / "llm_build.json").write_text(
        json.dumps(
            {"tensorrt_llm": tensorrt_llm.__version__, "plan": plan, "build_config": build_config},
            indent=2,
        ),
        encoding="utf-8",
    )
    return engine_dir


# what build_config_dict and conversion_plan read; the rest configures Triton, not the engine
ENGINE_SETTINGS = ("max_images", "llm_max_batch_size", "max_num_tokens", "text_budget", "max_output_len")
ENGINE_GPU_SETTINGS = ("dtype", "tp_size", "pp_size", "quantization")


def main() -> None:
    summary = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog="python -m build.trtllm_engine", description=summary, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="InternVL checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory (hf/, engine/, llm_build.json)")
    add_arguments(parser, BuildSettings, only=ENGINE_SETTINGS)
    add_arguments(parser, GpuSettings, only=ENGINE_GPU_SETTINGS)
    args = vars(parser.parse_args())
    model, out = args.pop("model"), args.pop("out")
    gpu = from_arguments(GpuSettings, args)
    print(build_llm_engine(model, out, from_arguments(BuildSettings, args), gpu))


if __name__ == "__main__":
    main()
