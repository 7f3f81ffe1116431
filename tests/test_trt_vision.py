"""build/trt_vision.py: profile arithmetic and metadata on CPU; the TensorRT build itself needs CUDA."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from build.export_vision import export_vision_onnx
from build.repository import BuildSettings
from build.trt_vision import TilesProfile, build_vision_engine, default_profile, engine_metadata
from engine.config import ModelConfig
from engine.vision import VisionEncoderModule
from tests import reference_preprocess


@pytest.mark.parametrize("values", [(0, 1, 2), (2, 1, 3), (1, 4, 3)])
def test_tiles_profile_refuses_unordered_or_empty_ranges(values):
    with pytest.raises(ValueError, match="min ≤ opt ≤ max"):
        TilesProfile(*values)


def test_default_profile_follows_the_config_and_the_seed_tiling(tiny):
    config = ModelConfig.from_pretrained(tiny)
    profile = default_profile(config)
    # max: a whole request (max_images images of max_dynamic_patch tiles + thumbnail each)
    assert profile.max_tiles == BuildSettings().max_images * (config.max_num + 1)
    # opt: what the cards' dynamic_preprocess makes of a 1920x1080 photo
    tiles = reference_preprocess.dynamic_preprocess(Image.new("RGB", (1920, 1080)), max_num=config.max_num, use_thumbnail=True)
    assert profile.opt_tiles == len(tiles)
    assert profile.min_tiles == 1
    assert profile.shapes(448) == ((1, 3, 448, 448), (len(tiles), 3, 448, 448), (profile.max_tiles, 3, 448, 448))
    assert default_profile(config, max_tiles=4).opt_tiles == 4  # opt never exceeds max


def test_metadata_names_the_engine_tensors_and_shapes(tiny):
    config = ModelConfig.from_pretrained(tiny)
    meta = engine_metadata(config, "float16", TilesProfile(1, 9, 52), "10.14.1.48")
    assert meta["input"] == {"name": "pixel_values", "dtype": "uint8", "shape": [-1, 3, 448, 448]}
    assert meta["output"] == {"name": "prompt_embedding_table", "dtype": "float16", "shape": [-1, config.text.hidden_size]}
    assert meta["tokens_per_tile"] == config.vision.tokens_per_tile == 256
    assert meta["tiles_profile"] == {"min_tiles": 1, "opt_tiles": 9, "max_tiles": 52}


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_build_says_where_to_run_it(tiny, tmp_path):
    config = ModelConfig.from_pretrained(tiny)
    with pytest.raises(RuntimeError, match="TensorRT is not installed.*container"):
        build_vision_engine(tmp_path / "x.onnx", tmp_path, config, TilesProfile(1, 1, 2), "float16")


@pytest.mark.gpu
def test_tensorrt_engine_matches_the_torch_module(tiny, tmp_path):
    import tensorrt as trt

    config = ModelConfig.from_pretrained(tiny)
    onnx_file = export_vision_onnx(tiny, tmp_path / "vision_fp16.onnx", "float16")
    plan = build_vision_engine(onnx_file, tmp_path, config, TilesProfile(1, 2, 4), "float16")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 448, 448), dtype=np.uint8)).cuda()
    out = torch.empty(3 * config.vision.tokens_per_tile, config.text.hidden_size, dtype=torch.float16, device="cuda")
    context.set_input_shape("pixel_values", tuple(pixels.shape))
    context.set_tensor_address("pixel_values", pixels.data_ptr())
    context.set_tensor_address("prompt_embedding_table", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    with torch.inference_mode():
        expected = VisionEncoderModule.from_pretrained(config)(pixels.cpu())
    cosine = torch.nn.functional.cosine_similarity(out.float().cpu(), expected, dim=-1)
    assert cosine.min() > 0.999
