"""`make bench-peers` logic that runs without llama.cpp: pairing of our llm_weights with llama.cpp's GGUF
types, the round order, the decode-rate arithmetic, the HF directory the converter reads, and the
converter shim's answer for a tokenizer it does not know by hash."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from bench_components.peers import PAIRS, decode_rate, prefix_match, round_order, select_pairs
from bench_components.peers_checkpoint import write_llm_checkpoint
from bench_components.peers_convert import PRE_TOKENIZER, _wanted, unknown_bpe_answer
from engine.llm.precision import LLM_WEIGHTS
from engine.weights import iter_weights


def test_pairs_follow_the_engines_llm_weights():
    active, notes = select_pairs(("float32", "float16"))
    assert active == [("float32", "f32"), ("float16", "f16")]
    assert len(notes) == 1 and "int8" in notes[0] and "q8_0" in notes[0] and "skipped" in notes[0]
    active, notes = select_pairs(("float32", "float16", "int8"))
    assert active == list(PAIRS) and notes == []
    active, _ = select_pairs(LLM_WEIGHTS)  # the engine as it is: fp32 and fp16 always race
    assert [ours for ours, _ in active] == [m for m in ("float32", "float16", "int8") if m in LLM_WEIGHTS]


def test_rounds_interleave_pairs_and_alternate_who_goes_first():
    active = [("float32", "f32"), ("float16", "f16")]
    assert round_order(active, 0) == [("ours", "float32"), ("llama.cpp", "f32"), ("ours", "float16"), ("llama.cpp", "f16")]
    assert round_order(active, 1) == [("llama.cpp", "f32"), ("ours", "float32"), ("llama.cpp", "f16"), ("ours", "float16")]


def test_decode_rate_counts_decode_steps_only():
    run = {"prefill_s": 10.0, "step_s": [0.1, 0.1, 0.2, 0.1]}
    assert decode_rate(run) == pytest.approx(4 / 0.5)
    assert prefix_match([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert prefix_match([1, 2], [1, 2, 3]) == 2


def test_llm_directory_is_what_the_converter_reads(tiny, tmp_path):
    out = write_llm_checkpoint(tiny, tmp_path / "llm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]  # picks the converter's Qwen3Model
    assert AutoConfig.from_pretrained(out).model_type == "qwen3"  # the converter's load_hparams
    assert not (out / "tokenizer.model").exists()  # so Qwen2/Qwen3 conversion takes the GPT-2 BPE path
    # the BPE path reads these: vocab (ids below vocab_size), added tokens, merges
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert max(tokenizer.vocab.values()) < config["vocab_size"]
    model = json.loads((out / "tokenizer.json").read_text())["model"]
    assert model["type"] == "BPE" and model["merges"]
    # PRE_TOKENIZER "gpt-2" is what our tokenizer does: byte-level with the GPT-2 split regex
    pre = json.loads((out / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["type"] == "ByteLevel" and pre["use_regex"] and not pre["add_prefix_space"]
    expected = {f"model.{k}": v for k, v in iter_weights(tiny, "language_model.")}
    expected.update({f"lm_head.{k}": v for k, v in iter_weights(tiny, "lm_head.")})  # tiny is untied
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    stamp = (out / "extracted_from.json").stat().st_mtime_ns
    assert write_llm_checkpoint(tiny, out) == out and (out / "extracted_from.json").stat().st_mtime_ns == stamp  # cached


def test_tied_model_gets_no_separate_head(tiny, tmp_path):
    # a tied copy of the tiny checkpoint: the released Qwen3-0.6B layout (no lm_head.weight)
    source = tmp_path / "tied"
    source.mkdir()
    for item in tiny.iterdir():
        if item.is_file() and item.name != "config.json":
            (source / item.name).symlink_to(item)
    config = json.loads((tiny / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (source / "config.json").write_text(json.dumps(config))
    out = write_llm_checkpoint(source, tmp_path / "llm")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def test_shim_names_only_an_unknown_bpe_tokenizer():
    def unknown(self, tokenizer):
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")

    def other(self, tokenizer):
        raise NotImplementedError("something else")

    assert unknown_bpe_answer(unknown)(None, None) == PRE_TOKENIZER == "gpt-2"
    assert unknown_bpe_answer(lambda self, tokenizer: "qwen2")(None, None) == "qwen2"
    with pytest.raises(NotImplementedError, match="something else"):
        unknown_bpe_answer(other)(None, None)


def test_sdist_members_extracted():
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    assert _wanted(root + "convert_hf_to_gguf.py")
    assert _wanted(root + "conversion/qwen.py")
    assert _wanted(root + "conversion")
    assert not _wanted(root + "convert_hf_to_gguf_update.py")
    assert not _wanted(root + "src/llama.cpp")
    assert not _wanted("llama_cpp_python-0.3.36/llama_cpp/llama.py")
