"""build/llm_checkpoint.py: the extracted causal-LM checkpoint loads in transformers and gives the same
logits as the InternVL model's language part on the same ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from build.llm_checkpoint import ExtractError, extract_llm_checkpoint, text_config
from engine.config import ConfigError
from tests import reference_chat


def _reference_logits(path, ids: torch.Tensor) -> torch.Tensor:
    full = reference_chat.model(path)
    hidden = full.model.language_model(input_ids=ids).last_hidden_state
    return full.lm_head(hidden)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("shard_bytes", [None, 200_000])
def test_extracted_llm_gives_the_full_models_logits(family, shard_bytes, checkpoints, tmp_path):
    path = checkpoints[family]
    out = extract_llm_checkpoint(path, tmp_path / "llm", **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    sharded = (out / "model.safetensors.index.json").is_file()
    assert sharded == (shard_bytes is not None)
    llm = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(llm).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    assert not any("vision" in name or "projector" in name for name in llm.state_dict())
    vocab = len(reference_chat.tokenizer(path))
    ids = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(hash(family) % 1000))
    with torch.no_grad():
        got = llm(input_ids=ids).logits
        expected = _reference_logits(path, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_tokenizer_and_rope_fields_travel_with_the_llm(checkpoints, tmp_path):
    path = checkpoints["qwen3"]
    out = extract_llm_checkpoint(path, tmp_path / "llm")
    text = "Describe the image in detail.<|im_end|>"
    assert AutoTokenizer.from_pretrained(out).encode(text) == reference_chat.tokenizer(path).encode(text)
    config = json.loads((out / "config.json").read_text())
    source = json.loads((path / "config.json").read_text())["text_config"]
    # transformers 4.x (TensorRT-LLM 1.2.1's pin) reads rope_theta / torch_dtype, 5.x rope_parameters / dtype
    assert config["rope_theta"] == source["rope_parameters"]["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["torch_dtype"] == config["dtype"] == "float32"


def test_re_extracting_into_the_same_directory_replaces_old_shards(checkpoints, tmp_path):
    path = checkpoints["qwen3"]
    extract_llm_checkpoint(path, tmp_path / "llm", shard_bytes=200_000)
    out = extract_llm_checkpoint(path, tmp_path / "llm")
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


@pytest.mark.parametrize(
    "model_type, message",
    [
        ("gpt_oss", "'gpt_oss' cannot be built for the GPU path: .*PyTorch backend"),
        ("qwen3_moe", "'qwen3_moe' cannot be built for the GPU path: .*normalization NONE and ignores norm_topk_prob"),
        ("mamba", "'mamba' is unknown"),
    ],
)
def test_families_without_a_tensorrt_engine_path_are_refused_by_name(model_type, message):
    with pytest.raises(ExtractError, match=message):
        text_config({"text_config": {"model_type": model_type}})


@pytest.mark.parametrize("model_type, architecture", [("qwen2", "Qwen2ForCausalLM"), ("internlm2", "LlamaForCausalLM")])
def test_supported_families_get_their_causal_lm_architecture(model_type, architecture):
    llm = {"model_type": model_type, "bias": False, "hidden_size": 64, "num_attention_heads": 4}
    config = text_config({"llm_config": llm})
    assert config["architectures"] == [architecture]
    assert config["model_type"] == architecture.removesuffix("ForCausalLM").lower() and "llm_family" not in config


def test_internlm2_extracts_as_the_llama_it_computes(tmp_path):
    """InternLM2 (InternVL2.5-2B/8B/26B, InternVL3-9B): Llama names, the grouped wqkv split, a Llama
    config that transformers loads; its logits equal the custom model's own language model (the test
    port's independent renaming, tests/reference_custom_chat.py)."""
    from build.checkpoint import generate
    from tests.reference_custom_chat import CustomInternVL

    custom = generate("tiny", "internlm2", tmp_path / "custom", fmt="custom", ps_version="v2")
    out = extract_llm_checkpoint(custom, tmp_path / "llm")
    llm, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(llm).__name__ == "LlamaForCausalLM" and not any(info.values())
    ids = torch.randint(0, 1024, (1, 31), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(llm.eval()(input_ids=ids).logits, CustomInternVL(custom).llm(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_internlm2_with_biases_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'bias'"):
        text_config({"llm_config": {"model_type": "internlm2", "bias": True, "hidden_size": 64, "num_attention_heads": 4}})


def test_custom_format_checkpoint_extracts_to_the_same_llm(checkpoints, tmp_path):
    """The GPU path's LLM extraction reads custom-format checkpoints (llm_config, language_model.*)
    too: same weights as the HF-native checkpoint the custom one was written from, same logits."""
    from build.checkpoint import generate

    custom = generate("tiny", "qwen2", tmp_path / "custom", seed=0, fmt="custom", ps_version="v2")
    assert "llm_config" in json.loads((custom / "config.json").read_text())
    out = extract_llm_checkpoint(custom, tmp_path / "llm")
    llm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, len(reference_chat.tokenizer(checkpoints["qwen2"])), (1, 29), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(llm(input_ids=ids).logits, _reference_logits(checkpoints["qwen2"], ids), rtol=0, atol=1e-5)


def test_defect_tied_qwen3_gets_an_lm_head_tensorrt_llm_can_load(tmp_path, monkeypatch):
    """InternVL3.5-1B/2B/4B tie lm_head to the embedding and store none; TensorRT-LLM's Qwen loader
    maps lm_head to embed_tokens only for qwen2 (tensorrt_llm/models/qwen/model.py), so the extraction
    writes lm_head.weight itself: a copy of the embedding, the same logits."""
    import dataclasses

    from safetensors import safe_open

    from build import checkpoint as generator

    monkeypatch.setitem(generator.PRESETS, "tiny-tied", dataclasses.replace(generator.PRESETS["tiny"], tie_word_embeddings=True))
    tied = generator.generate("tiny-tied", "qwen3", tmp_path / "tied")
    with safe_open(tied / "model.safetensors", "pt") as f:
        assert not any("lm_head" in k for k in f.keys())  # as the hub's tied checkpoints
    out = extract_llm_checkpoint(tied, tmp_path / "llm")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    llm, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    ids = torch.randint(0, 1024, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(llm.eval()(input_ids=ids).logits, _reference_logits(tied, ids), rtol=0, atol=1e-5)
