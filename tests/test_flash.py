"""InternVL3.5-Flash (ViR) checkpoints against a port of the remote code's generate_flash
(tests/reference_flash_chat.py): gate scores and both feature paths, the per-request routing, the
prompt with the compressed tiles' extra positions removed, and greedy tokens, for 0/1/2 images and
a second turn with either vision backend. The tiny checkpoint routes a mix of tiles (checked), so a
router that compressed all or nothing could not pass.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from build.checkpoint import generate
from engine.config import ConfigError, ModelConfig
from engine.flash import assemble, drop_compressed
from engine.pipeline import Pipeline
from engine.preprocess import load_images
from engine.vision import OnnxVisionEncoder, TorchVisionEncoder
from engine.vision_export import ensure_vision_onnx
from tests import reference_chat, reference_preprocess
from tests.reference_flash_chat import FlashInternVL
from tests.test_custom_format import IMAGES, MAX_NEW, MIN_MARGIN, SHORT_SYSTEM, SYSTEM

CASES = {  # name: (question, image keys, max_tiles)
    "text_only": ("Hello, who are you?", (), 12),
    "one_image": ("Describe the image in detail.", ("a",), 12),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nCompare the two images.", ("a", "b"), 12),
}


@pytest.fixture(scope="module")
def flash_path(tmp_path_factory):
    return generate("tiny", "qwen3", tmp_path_factory.mktemp("flash") / "ckpt", fmt="custom", flash=True)


@pytest.fixture(scope="module")
def port(flash_path):
    return FlashInternVL(flash_path)


@pytest.fixture(scope="module")
def pipelines(flash_path):
    made = {}

    def get(backend):
        if backend not in made:
            made[backend] = Pipeline.from_pretrained(flash_path, vision_backend=backend)
        return made[backend]

    yield get
    for pipe in made.values():
        pipe.close()


def _tiles(keys, max_tiles=12):
    return [reference_preprocess.load_image(io.BytesIO(IMAGES[k]), max_num=max_tiles).numpy() for k in keys]


def _uint8_tiles(keys, max_num=12):
    return load_images([IMAGES[k] for k in keys], input_size=448, max_num=max_num, min_num=1, use_thumbnail=True, normalize=False)[0]


def test_config_reads_the_flash_fields(flash_path):
    flash = ModelConfig.from_pretrained(flash_path).flash
    raw = json.loads((flash_path / "config.json").read_text())
    assert raw["flash_mode"] is True
    assert (flash.relative_threshold, flash.absolute_threshold) == (raw["flash_relative_threshold"], raw["flash_absolute_threshold"])
    assert flash.compressed_tokens_per_tile == 64


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_gate_and_both_paths_equal_the_port(backend, flash_path, port):
    config = ModelConfig.from_pretrained(flash_path)
    encoder = TorchVisionEncoder(config) if backend == "torch" else OnnxVisionEncoder(ensure_vision_onnx(flash_path), flash=config.flash)
    pixels = _uint8_tiles("ab")
    table, compressed, gate = encoder.run(pixels)
    full, small, ref_gate = port.extract_feature_flash(torch.from_numpy(np.concatenate(_tiles("ab"))))
    atol = 1e-5 if backend == "torch" else 1e-4
    np.testing.assert_allclose(gate, ref_gate.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(table, full.reshape(-1, full.shape[-1]).numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(compressed, small.reshape(-1, small.shape[-1]).numpy(), atol=atol, rtol=0)


@pytest.mark.parametrize("keys", ["a", "b", "ab", "c"])
def test_routing_equals_the_port_and_is_mixed(keys, flash_path, port):
    encoder = TorchVisionEncoder(ModelConfig.from_pretrained(flash_path))
    _, tile_tokens = encoder.encode_request(_uint8_tiles(keys))
    _, _, gate = port.extract_feature_flash(torch.from_numpy(np.concatenate(_tiles(keys))))
    expected = np.where(port.route(gate).numpy(), 64, 256)
    assert tile_tokens.tolist() == expected.tolist()
    assert 64 in expected and 256 in expected  # a mix: the test can tell routing from no routing


def test_routing_is_per_request_when_requests_share_a_vision_run(flash_path):
    """The Triton vision model runs several requests' tiles at once; each request's routing is its own
    (the quantile over all tiles of the batch would route differently: checked — a one-tile request
    is never compressed alone, its score being its own quantile, but would be among others)."""
    config = ModelConfig.from_pretrained(flash_path)
    encoder = OnnxVisionEncoder(ensure_vision_onnx(flash_path), flash=config.flash)
    requests = [_uint8_tiles("a", max_num=1), _uint8_tiles("c")]
    shared = encoder.encode_requests(requests)  # one run, as the Triton vision model does
    union = assemble(*encoder.run(np.concatenate(requests)), config.flash)[1]
    for pixels, (table, tokens) in zip(requests, shared):
        solo_table, solo_tokens = encoder.encode_request(pixels)
        assert tokens.tolist() == solo_tokens.tolist()
        np.testing.assert_allclose(table, solo_table, atol=1e-5, rtol=0)
    assert union.tolist() != np.concatenate([t for _, t in shared]).tolist()


def test_drop_compressed_keeps_the_first_q_positions_of_each_compressed_tile():
    vocab, q_full = 100, 8
    ids = np.array([1, 2] + list(range(100, 124)) + [3] + list(range(124, 132)) + [4], np.int32)  # 3 tiles, then 1
    tokens = np.array([8, 2, 8, 3], np.int32)
    kept = drop_compressed(ids, vocab, q_full, tokens)
    expected = [1, 2, *range(100, 108), 108, 109, *range(116, 124), 3, 124, 125, 126, 4]
    assert kept.tolist() == expected
    with pytest.raises(ValueError, match="tile"):
        drop_compressed(ids, vocab, q_full, tokens[:2])


def _reference(port, path, question, keys, history=None, system=SYSTEM):
    tiles = _tiles(keys)
    query, question = reference_chat.chat_query("internvl2_5", system, question, [len(t) for t in tiles], history)
    stop = ModelConfig.from_pretrained(path).stop_token_id
    tokens, margin = port.generate(query, np.concatenate(tiles) if tiles else None, stop, MAX_NEW)
    return tokens, margin, question


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_the_port(backend, case, flash_path, port, pipelines):
    question, keys, max_tiles = CASES[case]
    expected, margin, expected_question = _reference(port, flash_path, question, keys)
    assert margin > MIN_MARGIN
    result = pipelines(backend).generate(question, [IMAGES[k] for k in keys], max_new_tokens=MAX_NEW, max_tiles=max_tiles)
    assert result.token_ids == expected and result.question == expected_question
    if keys:  # the prompt the LLM ran is the compressed one
        compressed = int(port.last_compress.sum())
        assert compressed and result.prompt_tokens == len(port.tokenizer(reference_chat.chat_query("internvl2_5", SYSTEM, question, [len(t) for t in _tiles(keys)])[0]).input_ids) - 192 * compressed


def test_second_turn_equals_the_port(flash_path, port, pipelines):
    pipe = pipelines("onnxruntime")
    images = [IMAGES["a"], IMAGES["c"]]
    first, history = pipe.chat("<image>\n<image>\nDescribe both.", images, max_new_tokens=MAX_NEW, return_history=True)
    result = pipe.generate("Which one is brighter?", images, history=history, max_new_tokens=MAX_NEW)
    expected, margin, _ = _reference(port, flash_path, "Which one is brighter?", "ac", history)
    assert margin > MIN_MARGIN
    assert result.token_ids == expected


def test_reference_reply_depends_on_image_and_prompt(flash_path, port):
    question = CASES["one_image"][0]
    assert _reference(port, flash_path, question, "a")[0] != _reference(port, flash_path, question, "c")[0]
    replies = [_reference(port, flash_path, q, "", system=SHORT_SYSTEM)[0] for q in ("Hello, who are you?", "What color is the sky?")]
    assert replies[0] != replies[1]


def test_flash_mode_false_runs_the_plain_256_token_path(flash_path, tmp_path):
    """Without flash_mode the remote code's generate() takes generate_normal: mlp2 and the router unused."""
    plain = tmp_path / "plain"
    shutil.copytree(flash_path, plain, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((plain / "config.json").read_text())
    config["flash_mode"] = False
    (plain / "config.json").write_text(json.dumps(config))
    assert ModelConfig.from_pretrained(plain).flash is None
    port = FlashInternVL(plain)
    query, _ = reference_chat.chat_query("internvl2_5", SYSTEM, "<image>\nDescribe.", [len(t) for t in _tiles("a")])
    expected = super(FlashInternVL, port).generate(query, np.concatenate(_tiles("a")), ModelConfig.from_pretrained(plain).stop_token_id, MAX_NEW)[0]
    with Pipeline.from_pretrained(plain, vision_backend="torch") as pipe:
        assert pipe.generate("<image>\nDescribe.", [IMAGES["a"]], max_new_tokens=MAX_NEW).token_ids == expected


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"flash_mode": "yes"}, "flash_mode"),
        ({"flash_relative_threshold": None}, "flash_relative_threshold"),
        ({"flash_absolute_threshold": 1.5}, "flash_absolute_threshold"),
        ({"select_layer": -2}, "select_layer"),
    ],
)
def test_malformed_flash_config_is_refused_naming_the_field(edit, field, flash_path, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(flash_path / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_pretrained(tmp_path)


def test_gpu_build_refuses_flash_before_any_work(flash_path, tmp_path):
    from build.repository import build_gpu
    from build.settings import BuildSettings, GpuSettings

    with pytest.raises(ValueError, match="InternVL3.5-Flash"):
        build_gpu(flash_path, tmp_path / "out", BuildSettings(), GpuSettings())
    assert not (tmp_path / "out").exists()
