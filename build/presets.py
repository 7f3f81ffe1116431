"""Shapes of generated checkpoints: the test preset, and the real configurations of the seed models.

Real presets carry the widths, head counts, expert counts and vocabulary of the released models, so
memory sizing and benchmarks use real shapes; `--layers N` cuts their depth (language model and
vision tower) to fit a machine. Sources (read in OpenGVLab/InternVL and copies of the released
config.json files; the hub itself is not reachable here):
- InternViT-6B-448px-V2_5 (38B-class and 241B towers): 3200 wide, 45 layers, 25 heads, 12800 MLP —
  OpenGVLab's InternVL3.5 chat→HF conversion script (`vit_6b_config`), and transformers'
  models/internvl/convert_internvl_weights_to_hf.py; 45 layers also give the README's 5.5B.
- InternViT-300M-448px-V2_5: 1024 wide, 24 layers, 16 heads, 4096 MLP (same script).
- Skywork-R1V-38B's LLM, DeepSeek-R1-Distill-Qwen-32B (Qwen2): 5120 wide, 64 layers, 40/8 heads,
  27648 MLP, vocab 152064, untied — its hub record's parameter count, 32,763,876,352, is reproduced
  exactly by this shape (tests/test_presets.py). rope_theta 1e6 and rms_norm_eps 1e-5 are Qwen2.5-32B's.
- InternVL3.5-241B-A28B's LLM, Qwen3-235B-A22B (Qwen3-MoE): 4096 wide, 94 layers, 64/4 heads of 128,
  128 experts of 1536, top-8, normalised, vocab 151936, untied, 40960 positions (README: 235.1B).
- InternVL3.5-GPT-OSS-20B-A4B's LLM, openai/gpt-oss-20b (copy of its config.json): 2880 wide, 24
  layers, 64/8 heads of 64, 32 experts of 2880, top-4, window 128 on alternate layers, YaRN ×32 over
  4096, vocab 201088, untied (README: 20.9B). transformers' GptOssConfig defaults are the 120b's
  layer and expert counts (36, 128), not these.
The Skywork template name in its config.json was not found in any public copy; `internvl2_5` (ChatML,
as R1V3's evaluation code drives it) is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LLM_VARIANTS = {
    "qwen3": dict(model_type="qwen3", rope_theta=1_000_000.0),
    "qwen2": dict(model_type="qwen2", rope_theta=1_000_000.0),
    "llama": dict(model_type="llama", rope_theta=500_000.0, attention_bias=False, mlp_bias=False),
    # Expert counts and widths come from the preset (Preset.moe); layers in mlp_only_layers stay dense.
    "qwen3_moe": dict(model_type="qwen3_moe", rope_theta=1_000_000.0, norm_topk_prob=True, decoder_sparse_step=1),
    # Experts (count, top-k, width) come from Preset.moe; intermediate_size is the expert width.
    "gpt_oss": dict(
        model_type="gpt_oss",
        rope_theta=150_000.0,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096),
        sliding_window=128,
        attention_bias=True,
        max_position_embeddings=131072,  # = factor × original, as gpt-oss ships it
    ),
    # Made as Llama, written as InternLM2 (custom format only; write_custom).
    "internlm2": dict(model_type="llama", rope_theta=1_000_000.0, attention_bias=False, mlp_bias=False),
}

VISION_VARIANTS = {
    "internvit-300m": dict(attention_bias=True, norm_type="layer_norm", use_qk_norm=False),
    "internvit-6b": dict(attention_bias=False, norm_type="rms_norm", use_qk_norm=True),
}


@dataclass(frozen=True)
class Preset:
    vision: dict
    text: dict
    vocab_size: int | None  # None: the tokenizer's size rounded up to a multiple of 64
    tokenizer_vocab: int
    dtype: torch.dtype
    tie_word_embeddings: bool
    sharpen: dict = field(default_factory=dict)  # weight-scale knobs, see build.checkpoint._make_input_sensitive
    moe: dict | None = None  # expert shape (--llm qwen3_moe / gpt_oss); None: the preset has none
    llm: str | None = None  # the family of the real model (a real preset is that family only)
    vision_variant: str | None = None  # the tower of the real model
    family_text: dict = field(default_factory=dict)  # per-family text fields, applied last


_VIT_6B = dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25, intermediate_size=12800)
_VIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

PRESETS = {
    "tiny": Preset(
        vision=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
        text=dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
            max_position_embeddings=32768,
        ),
        vocab_size=None,
        tokenizer_vocab=1024,
        dtype=torch.float32,
        tie_word_embeddings=False,
        sharpen=dict(qk=4.0, projector=8.0, embed=4.0, lm_head=25.0, router=10.0, experts=3.0),
        # Layer 0 dense (mlp_only_layers), layer 1 sparse: both MLP paths run.
        moe=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96, mlp_only_layers=[0]),
        family_text={"gpt_oss": dict(sliding_window=64)},  # shorter than most test prompts
    ),
    # The shapes demo model (build/train_demo.py, models/shapes-demo): trained, so no sharpening; small
    # enough to ship in git at fp16 and to train on 2 CPU cores.
    "shapes-demo": Preset(
        vision=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=384),
        text=dict(
            hidden_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=48,
            intermediate_size=512,
            max_position_embeddings=32768,
        ),
        vocab_size=None,
        tokenizer_vocab=1024,
        dtype=torch.float16,
        tie_word_embeddings=True,
        llm="qwen3",
    ),
    # InternVL3.5-1B: InternViT-300M-448px-V2.5 + Qwen3-0.6B.
    "internvl3_5-1b": Preset(
        vision=_VIT_300M,
        text=dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            max_position_embeddings=40960,
        ),
        vocab_size=151936,
        tokenizer_vocab=1024,
        dtype=torch.bfloat16,
        tie_word_embeddings=True,
    ),
    # Skywork-R1V-38B (R1V2/R1V3 and SkyworkVL-38B share the tower and the Qwen2-32B width).
    "skywork-r1v-38b": Preset(
        vision=_VIT_6B,
        text=dict(
            hidden_size=5120,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=27648,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
        ),
        vocab_size=152064,
        tokenizer_vocab=1024,
        dtype=torch.bfloat16,
        tie_word_embeddings=False,
        llm="qwen2",
        vision_variant="internvit-6b",
    ),
    # InternVL3.5-241B-A28B: InternViT-6B-448px-V2.5 + Qwen3-235B-A22B.
    "internvl3_5-241b-a28b": Preset(
        vision=_VIT_6B,
        text=dict(
            hidden_size=4096,
            num_hidden_layers=94,
            num_attention_heads=64,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=12288,
            max_position_embeddings=40960,
        ),
        vocab_size=151936,
        tokenizer_vocab=1024,
        dtype=torch.bfloat16,
        tie_word_embeddings=False,
        moe=dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536, mlp_only_layers=[]),
        llm="qwen3_moe",
        vision_variant="internvit-6b",
    ),
    # InternVL3.5-GPT-OSS-20B-A4B: InternViT-300M-448px-V2.5 + gpt-oss-20b.
    "internvl3_5-gpt-oss-20b": Preset(
        vision=_VIT_300M,
        text=dict(
            hidden_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
        ),
        vocab_size=201088,
        tokenizer_vocab=1024,
        dtype=torch.bfloat16,
        tie_word_embeddings=False,
        moe=dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=2880),
        llm="gpt_oss",
    ),
}
