"""Generated checkpoints: plain transformers loads them; seeded; real InternVL shapes per preset."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from build.checkpoint import ADDED_TOKENS, PRESETS, build_config, generate, train_tokenizer
from engine.config import ModelConfig


def test_transformers_auto_classes_load_the_generated_checkpoint(tiny):
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    for token, special in ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert tokenizer.decode(tokenizer.encode(f"a{token}b"), skip_special_tokens=True) == ("ab" if special else f"a{token}b")
    text = "Describe the image. 这张图片显示了一只猫。"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # byte-level BPE round-trips any UTF-8
    assert AutoConfig.from_pretrained(tiny).image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")


def test_same_seed_same_weights_and_regeneration_is_a_no_op(tiny, tmp_path):
    again = generate("tiny", "qwen3", tmp_path / "again", seed=0)
    a, b = load_file(tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mtime = (again / "model.safetensors").stat().st_mtime_ns
    generate("tiny", "qwen3", again, seed=0)
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    other = load_file(generate("tiny", "qwen3", tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(a["language_model.model.embed_tokens.weight"], other["language_model.model.embed_tokens.weight"])


def test_special_and_padding_tokens_can_never_win(tiny):
    weights = load_file(tiny / "model.safetensors")
    lm_head = weights["language_model.lm_head.weight"]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    specials = [tokenizer.convert_tokens_to_ids(t) for t, special in ADDED_TOKENS if special]
    assert lm_head[specials].abs().max() == 0 and lm_head[len(tokenizer) :].abs().max() == 0
    assert lm_head.shape[0] > len(tokenizer)  # the vocab is padded, like Qwen's


def test_internvl3_5_1b_preset_has_the_real_shapes(tmp_path):
    config = build_config(PRESETS["internvl3_5-1b"], "qwen3", train_tokenizer(PRESETS["internvl3_5-1b"].tokenizer_vocab))
    (tmp_path / "config.json").write_text(config.to_json_string())
    train_tokenizer(PRESETS["internvl3_5-1b"].tokenizer_vocab).save_pretrained(tmp_path)
    c = ModelConfig.from_pretrained(tmp_path)
    assert (c.vision.hidden_size, c.vision.num_layers, c.vision.tokens_per_tile) == (1024, 24, 256)  # InternViT-300M
    assert (c.text.hidden_size, c.text.num_layers, c.text.num_heads, c.text.num_kv_heads) == (1024, 28, 16, 8)
    assert (c.text.head_dim, c.text.intermediate_size, c.text.vocab_size) == (128, 3072, 151936)  # Qwen3-0.6B
    assert c.text.qk_norm and json.loads(config.to_json_string())["text_config"]["tie_word_embeddings"]
