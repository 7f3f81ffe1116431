"""build/trt_vision.py: profile arithmetic and metadata on CPU; the TensorRT build itself needs CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from engine.vision_export import export_vision_onnx
from build.settings import BuildSettings
from build.trt_vision import TilesProfile, build_vision_engine, default_profile, engine_metadata
from build.vision_parity import compare, row_agreement
from engine.config import ModelConfig
from tests import reference_preprocess


@pytest.mark.parametrize("values", [(-1, 1, 2), (2, 1, 3), (1, 4, 3), (0, 0, 0)])
def test_tiles_profile_refuses_unordered_or_empty_ranges(values):
    with pytest.raises(ValueError, match="min ≤ opt ≤ max"):
        TilesProfile(*values)


def test_default_profile_follows_the_config_and_the_seed_tiling(tiny):
    config = ModelConfig.from_pretrained(tiny)
    settings = BuildSettings(max_images=2, max_batch_size=3)
    profile = default_profile(config, settings)
    # max: a full Triton batch (3 requests) of whole requests (2 images × (max_dynamic_patch + thumbnail))
    assert profile.max_tiles == 3 * 2 * (config.max_num + 1)
    # opt: what the cards' dynamic_preprocess makes of a 1920x1080 photo
    tiles = reference_preprocess.dynamic_preprocess(Image.new("RGB", (1920, 1080)), max_num=config.max_num, use_thumbnail=True)
    assert profile.opt_tiles == len(tiles)
    assert profile.min_tiles == 0  # a batch of text-only requests
    tile = 3 * 448 * 448
    assert profile.shapes(448) == ((0,), (len(tiles) * tile,), (profile.max_tiles * tile,))
    assert default_profile(config, BuildSettings(max_images=1, max_batch_size=1), opt_tiles=99).opt_tiles == config.max_num + 1


def test_metadata_names_the_engine_tensors_and_shapes(tiny):
    config = ModelConfig.from_pretrained(tiny)
    meta = engine_metadata(config, "float16", TilesProfile(0, 9, 52), "10.14.1.48")
    assert meta["input"] == {"name": "pixel_values", "dtype": "uint8", "shape": [-1]}
    q, h = config.vision.tokens_per_tile, config.text.hidden_size
    assert meta["output"] == {"name": "prompt_embedding_table", "dtype": "float16", "shape": [-1, q, h]}
    assert meta["tokens_per_tile"] == q == 256
    assert meta["tiles_profile"] == {"min_tiles": 0, "opt_tiles": 9, "max_tiles": 52}


def test_ragged_export_is_the_tiled_graph_on_flat_input(tiny, tmp_path):
    """The plan's graph (flat uint8 in, [T, Q, H] out) computes what the CPU graph computes, down
    to an empty batch; its uint8 input feeds only a Cast, as TensorRT requires."""
    import onnx
    import onnxruntime as ort

    config = ModelConfig.from_pretrained(tiny)
    ragged = ort.InferenceSession(str(export_vision_onnx(tiny, tmp_path / "ragged.onnx", ragged=True)))
    tiled = ort.InferenceSession(str(export_vision_onnx(tiny, tmp_path / "tiled.onnx")))
    pixels = np.random.default_rng(3).integers(0, 256, (3, 3, 448, 448), dtype=np.uint8)
    flat_out = ragged.run(None, {"pixel_values": pixels.reshape(-1)})[0]
    q, h = config.vision.tokens_per_tile, config.text.hidden_size
    assert flat_out.shape == (3, q, h)
    np.testing.assert_allclose(flat_out.reshape(-1, h), tiled.run(None, {"pixel_values": pixels})[0], rtol=1e-4, atol=1e-4)
    assert ragged.run(None, {"pixel_values": np.zeros(0, np.uint8)})[0].shape == (0, q, h)
    graph = onnx.load(str(tmp_path / "ragged.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node if "pixel_values" in n.input] == ["Cast"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_build_says_where_to_run_it(tiny, tmp_path):
    config = ModelConfig.from_pretrained(tiny)
    with pytest.raises(RuntimeError, match="TensorRT is not installed.*container"):
        build_vision_engine(tmp_path / "x.onnx", tmp_path, config, TilesProfile(1, 1, 2), "float16")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_the_tool_without_tensorrt_says_so_in_one_line_and_writes_nothing(tiny, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "build.trt_vision", "--model", str(tiny), "--out", str(tmp_path / "plan")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == "error: TensorRT is not installed: build the GPU path inside the TensorRT-LLM Triton container (docs/GPU.md)\n"
    assert not (tmp_path / "plan").exists()  # formerly a vision_encoder.float16.onnx was left behind


def test_parity_metric_reports_the_worst_row():
    expected = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    assert row_agreement(expected, expected) == (pytest.approx(1.0), 0.0)
    actual = expected.copy()
    actual[1, 2] = -actual[1, 2]  # one row flipped: cosine -1, the others 1
    cosine, max_abs = row_agreement(actual, expected)
    assert cosine == pytest.approx(-1.0) and max_abs == pytest.approx(2 * np.abs(expected[1, 2]).max())
    assert row_agreement(expected[:0], expected[:0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        row_agreement(expected[:1], expected)


@pytest.mark.gpu
def test_tensorrt_plan_matches_onnx_runtime(tiny, tmp_path):
    """build.vision_parity on the tiny checkpoint's fp16 plan, an empty batch included."""
    config = ModelConfig.from_pretrained(tiny)
    onnx_file = export_vision_onnx(tiny, tmp_path / "vision_fp16.onnx", "float16", ragged=True)
    plan = build_vision_engine(onnx_file, tmp_path, config, TilesProfile(0, 2, 4), "float16")
    rows = compare(tiny, plan, [0, 1, 4])
    assert all(row["min_cosine"] > 0.999 for row in rows), rows


class _BuilderConfig:
    """IBuilderConfig's timing-cache calls: a cache written by another TensorRT version is refused."""

    def __init__(self, accepts_stored: bool):
        self.accepts_stored, self.set_with = accepts_stored, None

    def create_timing_cache(self, data: bytes):
        return {"from": data}

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        ok = not cache["from"] or self.accepts_stored
        self.set_with = cache if ok else self.set_with
        return ok


@pytest.mark.parametrize("stored, accepted, used", [(None, True, b""), (b"old", True, b"old"), (b"old", False, b"")])
def test_defect_a_timing_cache_tensorrt_refuses_is_replaced_not_silently_dropped(stored, accepted, used, tmp_path):
    from build.trt_vision import timing_cache

    cache_file = tmp_path / "timing.cache"
    if stored is not None:
        cache_file.write_bytes(stored)
    config = _BuilderConfig(accepted)
    cache = timing_cache(config, cache_file)
    assert cache == {"from": used} and config.set_with is cache  # the cache the build uses is the one written back
