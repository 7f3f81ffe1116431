"""LLM families the CPU engine cannot run are refused when the checkpoint loads, by name."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.config import SUPPORTED_TEXT_MODELS, ConfigError, ModelConfig
from engine.pipeline import Pipeline

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
