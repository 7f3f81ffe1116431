"""`make build`: every config.pbtxt parses as Triton's ModelConfig, holds the checkpoint's values, and rebuilds are idempotent."""

from __future__ import annotations

import json

import pytest

from build.repository import TARGET_MODELS, build
from build.settings import BuildSettings
from engine.config import ModelConfig
from tests.repository_checks import assert_ensemble_wired, parse_configs

MODELS = TARGET_MODELS["cpu"]


def test_generated_configs_parse_and_carry_the_checkpoint_shapes(tiny, tmp_path):
    settings = BuildSettings(max_images=3, llm_max_batch_size=5)
    build(tiny, tmp_path, settings)
    config = ModelConfig.from_pretrained(tiny)
    configs = parse_configs(tmp_path / "model_repository", MODELS)
    tensors = {m: {t.name: t for t in (*c.input, *c.output)} for m, c in configs.items()}
    s, h = config.vision.image_size, config.text.hidden_size
    # preprocess batches nothing itself and declares the ensemble's batch dimension (its template says why)
    assert configs["preprocess"].max_batch_size == 0 and list(tensors["preprocess"]["pixel_values"].dims) == [-1, -1, 3, s, s]
    assert list(tensors["vision_encoder"]["prompt_embedding_table"].dims) == [-1, h]
    assert list(tensors["llm"]["prompt_embedding_table"].dims) == [-1, h]
    assert configs["llm"].model_transaction_policy.decoupled
    assert configs["vision_encoder"].input[0].allow_ragged_batch
    params = {k: v.string_value for k, v in configs["preprocess"].parameters.items()}
    assert int(params["max_tiles_per_request"]) == 3 * config.max_tiles_per_image
    assert int(configs["llm"].parameters["max_batch_size"].string_value) == 5
    for m in MODELS:  # no placeholder left behind
        assert "${" not in (tmp_path / "model_repository" / m / "config.pbtxt").read_text()


def test_ensemble_wires_every_tensor_to_a_producer_with_matching_type(tiny, tmp_path):
    build(tiny, tmp_path)
    assert_ensemble_wired(parse_configs(tmp_path / "model_repository", MODELS))


def test_rebuilding_is_idempotent(tiny, tmp_path, capsys):
    build(tiny, tmp_path)
    onnx = tmp_path / "vision_encoder.onnx"
    mtime = onnx.stat().st_mtime_ns
    first = {m: (tmp_path / "model_repository" / m / "config.pbtxt").read_text() for m in MODELS}
    build(tiny, tmp_path)
    assert "up to date" in capsys.readouterr().out
    assert onnx.stat().st_mtime_ns == mtime
    assert first == {m: (tmp_path / "model_repository" / m / "config.pbtxt").read_text() for m in MODELS}
    assert json.loads((tmp_path / "build.json").read_text())["values"]["hidden_size"] == ModelConfig.from_pretrained(tiny).text.hidden_size


def test_limits_follow_the_config_and_the_settings(tiny):
    config = ModelConfig.from_pretrained(tiny)
    settings = BuildSettings(max_images=3, max_batch_size=4, llm_max_batch_size=6, text_budget=1000, max_output_len=500)
    limits = settings.limits(config)
    q, per_image = config.vision.tokens_per_tile, config.max_num + 1  # + thumbnail
    assert limits["max_tiles_per_request"] == 3 * per_image
    assert limits["max_input_len"] == min(3 * per_image * q + 1000, config.text.max_position_embeddings - 1)
    assert limits["max_seq_len"] == min(limits["max_input_len"] + 500, config.text.max_position_embeddings)
    assert limits["vision_max_tiles_per_run"] == 4 * 3 * per_image
    assert limits["max_multimodal_len"] == 6 * 3 * per_image * q


@pytest.mark.parametrize("field", ["max_images", "max_batch_size", "llm_max_batch_size", "max_num_tokens"])
def test_settings_refuse_non_positive_limits(field):
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        BuildSettings(**{field: 0})
