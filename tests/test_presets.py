"""Real-shape presets (build/presets.py): the shapes of the released seed models, checked by
parameter count against the published figures (counted on the meta device: nothing is allocated),
usable with --layers to cut depth, and refusing a family or tower the real model does not have."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from build.checkpoint import HARMONY_TOKENS, build_config, check_preset, train_tokenizer
from build.presets import PRESETS
from engine.text_config import text_config

REAL = {  # preset: (family, tower, published LLM parameters, tolerance), published vision parameters
    # DeepSeek-R1-Distill-Qwen-32B's hub record: safetensors BF16 parameters, exactly
    "skywork-r1v-38b": ("qwen2", "internvit-6b", 32_763_876_352, 0),
    # InternVL3.5 README table: language part 235.1B (241B-A28B), 20.9B (GPT-OSS-20B-A4B)
    "internvl3_5-241b-a28b": ("qwen3_moe", "internvit-6b", 235.1e9, 0.05e9),
    "internvl3_5-gpt-oss-20b": ("gpt_oss", "internvit-300m", 20.9e9, 0.05e9),
}
VISION = {"internvit-6b": 5.5e9, "internvit-300m": 0.3e9}  # InternViT-6B-448px-V2.5 / 300M-448px-V2.5


def _meta_model(name, layers=None):
    family, tower, *_ = REAL[name]
    tokenizer = train_tokenizer(PRESETS[name].tokenizer_vocab, HARMONY_TOKENS if family == "gpt_oss" else ())
    config = build_config(PRESETS[name], family, tokenizer, tower, layers)
    with torch.device("meta"):
        return config, InternVLForConditionalGeneration(config)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_preset_has_the_published_parameter_counts(name):
    config, model = _meta_model(name)
    family, tower, llm_params, tolerance = REAL[name]
    llm = _count(model.model.language_model) + _count(model.lm_head)
    assert abs(llm - llm_params) <= tolerance, llm
    assert abs(_count(model.model.vision_tower) - VISION[tower]) <= 0.05e9
    assert config.text_config.model_type == family
    parsed = text_config(config.text_config.to_dict(), "text_config")  # the engine reads the shape as written
    assert parsed.num_layers == PRESETS[name].text["num_hidden_layers"]


def test_gpt_oss_preset_keeps_the_real_attention_and_rotary():
    config, _ = _meta_model("internvl3_5-gpt-oss-20b")
    parsed = text_config(config.text_config.to_dict(), "text_config")
    assert (parsed.sliding_window, parsed.sliding_layers) == (128, tuple(range(0, 24, 2)))
    assert (parsed.num_experts, parsed.num_experts_per_tok, parsed.moe_intermediate_size) == (32, 4, 2880)
    assert parsed.yarn.factor == 32 and parsed.yarn.original_max_position_embeddings == 4096 and not parsed.yarn.truncate


@pytest.mark.parametrize("name", sorted(REAL))
def test_layers_cut_depth_and_keep_widths(name):
    full, _ = _meta_model(name)
    cut, model = _meta_model(name, layers=2)
    assert cut.text_config.num_hidden_layers == 2 and cut.vision_config.num_hidden_layers == 2
    for key in ("hidden_size", "num_attention_heads", "vocab_size"):
        assert getattr(cut.text_config, key) == getattr(full.text_config, key)
    assert cut.vision_config.hidden_size == full.vision_config.hidden_size
    assert len(model.model.language_model.layers) == 2


@pytest.mark.parametrize(
    "name, llm, tower, message",
    [
        ("skywork-r1v-38b", "llama", "internvit-6b", "qwen2 language model"),
        ("internvl3_5-241b-a28b", "qwen3_moe", "internvit-300m", "internvit-6b tower"),
        ("internvl3_5-1b", "qwen3_moe", "internvit-300m", "no expert shape"),
        ("internvl3_5-1b", "internlm2", "internvit-300m", "head_dim"),
    ],
)
def test_a_preset_refuses_what_its_model_is_not(name, llm, tower, message):
    with pytest.raises(ValueError, match=message):
        check_preset(PRESETS[name], llm, tower)


def test_cli_refuses_before_making_anything(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "build.checkpoint", "--preset", "skywork-r1v-38b", "--llm", "llama", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "qwen2 language model" in out.stderr
    assert not (tmp_path / "x").exists()
