"""Extract the language model of an InternVL checkpoint as a plain Hugging Face causal-LM checkpoint.

    python -m build.llm_checkpoint --model <internvl checkpoint> --out <dir>

TensorRT-LLM's converters (`QWenForCausalLM` / `LLaMAForCausalLM.from_hugging_face`,
`examples/models/core/*/convert_checkpoint.py`) read a causal-LM directory: its `config.json` is the
InternVL `text_config` with `architectures`, its weights are `model.*` / `lm_head.*`, and the
tokenizer files sit beside them. The config carries the rope and dtype fields under both the
transformers 5 names (`rope_parameters`, `dtype`) and the 4.x names TensorRT-LLM 1.2.1 reads
(`rope_theta`, `rope_scaling`, `torch_dtype`; it pins transformers 4.57.3). Tensors are streamed
file by file into shards, so a 32B language model never has to fit in memory at once. An InternLM2
language model (custom format, `bias` false) is written as the Llama it computes: Llama names, the
grouped `wqkv` split (engine/custom_format.py, engine/weights.py), a Llama config — the class
TensorRT-LLM's MODEL_MAP also assigns to InternLM2ForCausalLM, LLaMAForCausalLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from build.shards import SHARD_BYTES, ShardWriter
from engine.custom_format import internlm2_text_config
from engine.weights import iter_weights



@dataclass(frozen=True)
class TrtllmSupport:
    """What TensorRT-LLM 1.2.1's TensorRT-engine path does with one LLM family."""

    hf_architecture: str | None  # the causal-LM class of the extracted checkpoint
    converter: str | None  # how TensorRT-LLM converts it; None: no TensorRT-engine path
    reason: str = ""  # why it is refused (converter None)


# Sources (read for TensorRT-LLM 1.0–1.2; the v1.2.1 tag itself was not in the index, see docs/GPU.md):
# tensorrt_llm/models/__init__.py MODEL_MAP (Qwen2/Qwen3ForCausalLM -> QWenForCausalLM,
# LlamaForCausalLM / InternLM2ForCausalLM -> LLaMAForCausalLM); models/qwen/model.py and
# models/llama/model.py forward(prompt_embedding_table, prompt_tasks, prompt_vocab_size);
# docs/source/release-notes.md 1.0 "TensorRT-Engine Qwen3 (dense) model support";
# examples/models/core/gpt_oss/README.md
# (trtllm-serve --backend pytorch only).
TRTLLM_SUPPORT = {
    "qwen2": TrtllmSupport("Qwen2ForCausalLM", "tensorrt_llm.models.QWenForCausalLM.from_hugging_face"),
    "qwen3": TrtllmSupport("Qwen3ForCausalLM", "tensorrt_llm.models.QWenForCausalLM.from_hugging_face"),
    "llama": TrtllmSupport("LlamaForCausalLM", "tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face"),
    # extracted as Llama (bias false is Llama's computation): no example script, no remote code
    "internlm2": TrtllmSupport("LlamaForCausalLM", "tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face"),
    # MODEL_MAP maps Qwen3MoeForCausalLM to QWenForCausalLM (PR #6470, TensorRT-LLM 1.0), but
    # models/qwen/config.py builds every Qwen MoE config with MoeConfig normalization NONE and never
    # reads norm_topk_prob (layers/moe.py: NONE = top-k of the softmax, not renormalised), while the
    # InternVL3.5 MoE checkpoints ship norm_topk_prob true: the engine would route differently.
    "qwen3_moe": TrtllmSupport(
        None,
        None,
        "TensorRT-LLM's QWenForCausalLM.from_hugging_face builds Qwen3-MoE with MoE normalization NONE and ignores "
        "norm_topk_prob (models/qwen/config.py), so its routing would differ from the checkpoint's; "
        "serve it on the CPU path, or with vLLM",
    ),
    "gpt_oss": TrtllmSupport(
        None, None, "TensorRT-LLM 1.2.1 runs GPT-OSS only on its PyTorch backend: no TensorRT engine, no prompt table"
    ),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class ExtractError(ValueError):
    pass


def trtllm_support(model_type: str | None) -> TrtllmSupport:
    """The support entry of an LLM family; ExtractError naming the family and the reason otherwise."""
    support = TRTLLM_SUPPORT.get(model_type)
    if support is None:
        raise ExtractError(f"text_config.model_type {model_type!r} is unknown; known: {sorted(TRTLLM_SUPPORT)}")
    if support.converter is None:
        raise ExtractError(f"text_config.model_type {model_type!r} cannot be built for the GPU path: {support.reason}")
    return support


def text_config(internvl_config: dict) -> dict:
    """The InternVL config's text_config as a standalone causal-LM config."""
    text = dict(internvl_config.get("text_config") or internvl_config.get("llm_config") or {})
    support = trtllm_support(text.get("model_type"))
    if text.get("model_type") == "internlm2":
        text = internlm2_text_config(text)  # Llama-shaped; refuses what is not Llama's computation
        text.pop("llm_family")
    text["architectures"] = [support.hf_architecture]
    text.setdefault("tie_word_embeddings", internvl_config.get("tie_word_embeddings", False))
    dtype = text.get("dtype") or text.get("torch_dtype") or internvl_config.get("dtype") or internvl_config.get("torch_dtype")
    if dtype:
        text["dtype"] = text["torch_dtype"] = dtype
    rope = text.get("rope_parameters")
    if rope and "rope_theta" in rope:
        text["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        text["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    return text


def extract_llm_checkpoint(checkpoint: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    internvl = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config = text_config(internvl)
    shards = ShardWriter(out, shard_bytes)
    # stored dtype, file by file, vision tensors never read; InternLM2's wqkv split into q/k/v
    for prefix, causal_lm_prefix in (("language_model.", "model."), ("lm_head.", "lm_head.")):
        for name, tensor in iter_weights(checkpoint, prefix):
            shards.add(causal_lm_prefix + name, tensor)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in shards and "model.embed_tokens.weight" in shards:
        # Tied models store no lm_head; TensorRT-LLM's QWenForCausalLM.from_hugging_face maps lm_head to
        # embed_tokens only for qwen2 / qwen2_vl (tensorrt_llm/models/qwen/model.py), so a tied Qwen3
        # (InternVL3.5-1B/2B/4B) would fail in ModelWeightsLoader without this copy.
        shards.add("lm_head.weight", dict(iter_weights(checkpoint, "language_model.embed_tokens."))["weight"])
    if not shards.total_bytes:
        raise ExtractError(f"{checkpoint} has no language-model weights")
    shards.close()
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.llm_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="InternVL checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the causal-LM checkpoint")
    args = parser.parse_args()
    print(extract_llm_checkpoint(args.model, args.out))


if __name__ == "__main__":
    main()
