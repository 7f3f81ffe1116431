"""The language model of a generated InternVL checkpoint as a plain HF causal-LM directory
(Qwen3ForCausalLM for the internvl3_5-1b preset), the input llama.cpp's convert_hf_to_gguf.py reads (it
has no text path for HF-native InternVLForConditionalGeneration).

What the directory holds, and why:
- model.safetensors: the decoder tensors exactly as stored (no dtype change: the bf16 values our engine
  widens to fp32 are the values the converter writes as f32, or rounds to f16 / q8_0), under the
  causal-LM names (`model.layers.N.…`, `model.embed_tokens.weight`, `model.norm.weight`). A tied model
  gets no `lm_head.weight`, as the released Qwen3-0.6B ships, so the GGUF has no separate `output`
  tensor and llama.cpp runs the tied head, like our engine. (This is the one difference from
  build/llm_checkpoint.py's extraction, which copies the head for TensorRT-LLM's Qwen3 loader; its
  config and tokenizer-file list are reused here.)
- config.json: build.llm_checkpoint.text_config — the checkpoint's `text_config` with
  `architectures: ["Qwen3ForCausalLM"]` (which picks the converter's Qwen3 class), rope_theta and dtype
  under both transformers' 5 and 4 names;
- tokenizer.json / tokenizer_config.json (and the other tokenizer files present): our own tokenizer,
  copied unchanged. There is deliberately no SentencePiece tokenizer.model: Qwen2/Qwen3 conversion
  tries SentencePiece first and takes the GPT-2 BPE path on its absence, which reads the vocabulary
  (padded with `[PAD{i}]` up to vocab_size), token types, merges and special ids from these files. The
  one thing that path cannot take from a file is the pre-tokenizer's name: it hashes the ids of a fixed
  text and knows only published tokenizers' hashes (bench_components/peers_convert.py answers it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from build.llm_checkpoint import TOKENIZER_FILES, text_config
from engine.weights import iter_weights


def decoder_tensors(checkpoint: Path, tied: bool) -> dict:
    """{causal-LM name: tensor} in the stored dtype; lm_head.weight only when untied."""
    tensors = {f"model.{name}": t.contiguous() for name, t in iter_weights(checkpoint, "language_model.")}
    if not tensors:
        raise KeyError(f"{checkpoint} has no language_model.* weights")
    if not tied:
        head = dict(iter_weights(checkpoint, "lm_head."))
        if "weight" not in head:
            raise KeyError(f"{checkpoint}: untied embeddings but no lm_head.weight")
        tensors["lm_head.weight"] = head["weight"].contiguous()
    return tensors


def write_llm_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Writes `out` (skipped when it already holds the LLM of this exact checkpoint); -> out."""
    stamp_src = checkpoint / "generated_by.json"
    stamp = {"source": str(checkpoint), "generated_by": json.loads(stamp_src.read_text(encoding="utf-8")) if stamp_src.is_file() else None}
    stamp_file = out / "extracted_from.json"
    if stamp["generated_by"] is not None and stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
        return out
    config = text_config(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(decoder_tensors(checkpoint, config["tie_word_embeddings"]), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out / name)
    stamp_file.write_text(json.dumps(stamp), encoding="utf-8")
    return out
