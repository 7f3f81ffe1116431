"""LLM families the CPU engine cannot run are refused when the checkpoint loads, by name; the
families it runs use every weight their config declares."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from engine.config import ConfigError, ModelConfig
from engine.text_config import SUPPORTED_TEXT_MODELS
from engine.llm.model import DecoderLM
from engine.pipeline import Pipeline
from engine.sampling_params import SamplingParams
from tests.test_llm_engine import Setup, reference_generate, run_alone, text_ids, tokens_of

# internlm2 runs from custom-format checkpoints only (llm_config; tests/test_internlm2.py): transformers
# has no InternLM2 model, so an HF-native text_config naming it is refused.
UNSUPPORTED = [t for t in ("gpt_oss", "internlm2", "mamba", None) if t not in SUPPORTED_TEXT_MODELS]


def _with_model_type(src, dst, model_type):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config = json.loads((dst / "config.json").read_text())
    if model_type is None:
        del config["text_config"]["model_type"]
    else:
        config["text_config"]["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("model_type", UNSUPPORTED)
def test_unsupported_family_is_refused_naming_model_type_and_the_supported_ones(model_type, tiny, tmp_path):
    path = _with_model_type(tiny, tmp_path, model_type)
    for load in (ModelConfig.from_pretrained, lambda p: Pipeline.from_pretrained(p, vision_backend="torch")):
        with pytest.raises(ConfigError) as error:
            load(path)
        message = str(error.value)
        assert f"text_config.model_type {model_type!r} is not supported" in message
        assert all(family in message for family in SUPPORTED_TEXT_MODELS)


def test_llama_with_attention_and_mlp_biases_equals_transformers(checkpoints, tmp_path):
    """Llama's attention_bias puts biases on q/k/v and o_proj, mlp_bias on gate/up/down: all are used."""
    src = checkpoints["llama"]
    raw = json.loads((src / "config.json").read_text())
    raw["text_config"].update(attention_bias=True, mlp_bias=True)
    torch.manual_seed(3)
    ref = InternVLForConditionalGeneration(InternVLConfig.from_dict(raw)).eval()
    ref.load_state_dict(InternVLForConditionalGeneration.from_pretrained(src).state_dict(), strict=False)
    with torch.no_grad():
        biases = {n: p for n, p in ref.model.language_model.named_parameters() if n.endswith(".bias")}
        assert any(".o_proj." in n for n in biases) and any(".down_proj." in n for n in biases)
        for p in biases.values():
            p.copy_(torch.randn(p.shape) * 0.5)
    ref.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, tmp_path / name)
    config = ModelConfig.from_pretrained(tmp_path)
    setup = Setup(tmp_path, config, DecoderLM.from_pretrained(tmp_path, config.text), ref)
    ids = text_ids(np.random.default_rng(9), 11)
    assert tokens_of(run_alone(setup, ids, SamplingParams(max_new_tokens=10))) == reference_generate(setup, ids, 10)
