"""`make build`: every config.pbtxt parses as Triton's ModelConfig, holds the checkpoint's values, and rebuilds are idempotent."""

from __future__ import annotations

import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.repository import MODELS, BuildSettings, build
from engine.config import ModelConfig


def _configs(out) -> dict[str, model_config_pb2.ModelConfig]:
    return {
        m: text_format.Parse((out / "model_repository" / m / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        for m in MODELS
    }


def test_generated_configs_parse_and_carry_the_checkpoint_shapes(tiny, tmp_path):
    settings = BuildSettings(max_images=3, llm_max_batch_size=5)
    build(tiny, tmp_path, settings)
    config = ModelConfig.from_pretrained(tiny)
    configs = _configs(tmp_path)
    tensors = {m: {t.name: t for t in (*c.input, *c.output)} for m, c in configs.items()}
    s, h = config.vision.image_size, config.text.hidden_size
    assert list(tensors["preprocess"]["pixel_values"].dims) == [-1, 3, s, s]
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
    configs = _configs(tmp_path)
    ensemble = configs["internvl"]
    available = {t.name: (t.data_type, len(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        inputs = {t.name: t for t in model.input}
        for key, value in step.input_map.items():
            assert value in available, f"{step.model_name}.{key} reads {value}, which nothing produced"
            assert available[value] == (inputs[key].data_type, len(inputs[key].dims)), (step.model_name, key)
        outputs = {t.name: t for t in model.output}
        for key, value in step.output_map.items():
            available[value] = (outputs[key].data_type, len(outputs[key].dims))
        required = {t.name for t in model.input if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
    assert all(o.name in available for o in ensemble.output)


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
