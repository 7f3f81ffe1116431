"""Vision encoder: our module equals transformers' get_image_features; ONNX Runtime equals PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.preprocess import normalize_tiles
from engine.vision_export import export_vision_onnx
from engine.vision import Float32Norm, OnnxVisionEncoder, TorchVisionEncoder, VisionEncoderModule, default_onnx_path, load_vision_encoder
from tests import reference_chat


@pytest.fixture(scope="module")
def encoders(tiny):
    config = ModelConfig.from_pretrained(tiny)
    return config, TorchVisionEncoder(config), OnnxVisionEncoder(default_onnx_path(tiny))


def _pixels(num_tiles: int, seed: int) -> np.ndarray:
    # uint8 tiles, what load_images(normalize=False) gives the encoders
    return np.random.default_rng(seed).integers(0, 256, (num_tiles, 3, 448, 448), dtype=np.uint8)


@pytest.mark.parametrize("num_tiles", [1, 5, 13])
def test_onnx_matches_torch_for_dynamic_tile_counts(encoders, num_tiles):
    config, torch_encoder, onnx_encoder = encoders
    pixels = _pixels(num_tiles, seed=num_tiles)
    expected = torch_encoder.encode(pixels)
    got = onnx_encoder.encode(pixels)
    q, h = config.vision.tokens_per_tile, config.text.hidden_size
    assert got.shape == expected.shape == (num_tiles * q, h)
    assert np.abs(got - expected).max() <= 1e-4


def test_runs_of_one_tile_give_the_same_features_per_request_and_keep_no_arena(encoders, tiny):
    """A Triton batch of requests runs one tile per ONNX Runtime run (TILES_PER_RUN) with the features
    of one run of everything; the session's CPU arena is off, so memory is returned after each run
    (issue 13's soak)."""
    _, _, chunked = encoders
    whole = OnnxVisionEncoder(default_onnx_path(tiny), tiles_per_run=None)
    requests = [_pixels(n, seed=40 + n) for n in (3, 1, 2)]
    expected = whole.encode_requests(requests)
    got = chunked.encode_requests(requests)
    for (table, tokens), (expected_table, expected_tokens) in zip(got, expected):
        assert np.abs(table - expected_table).max() <= 1e-5 and np.array_equal(tokens, expected_tokens)
    assert not np.allclose(got[0][0][: len(got[2][0])], got[2][0])  # the requests' features differ
    assert not chunked.session.get_session_options().enable_cpu_mem_arena


def test_torch_encoder_matches_transformers_image_features(encoders, tiny):
    _, torch_encoder, _ = encoders
    pixels = _pixels(3, seed=7)
    normalized = torch.from_numpy(normalize_tiles(pixels))  # the cards' ToTensor + Normalize, bit-exact
    with torch.no_grad():
        reference = reference_chat.model(tiny).model.get_image_features(pixel_values=normalized)
    expected = reference.pooler_output.reshape(-1, reference.pooler_output.shape[-1]).numpy()
    np.testing.assert_allclose(torch_encoder.encode(pixels), expected, atol=1e-5, rtol=0)


def test_features_follow_tile_order(encoders):
    """Row block k of the table belongs to tile k: swapping tiles swaps the blocks."""
    config, _, onnx_encoder = encoders
    q = config.vision.tokens_per_tile
    pixels = _pixels(2, seed=3)
    a = onnx_encoder.encode(pixels)
    b = onnx_encoder.encode(pixels[::-1].copy())
    np.testing.assert_allclose(a[:q], b[q:], atol=1e-5)
    assert np.abs(a[:q] - a[q:]).max() > 1e-2


def test_unknown_backend_and_missing_onnx_are_clear_errors(tiny, tmp_path):
    config = ModelConfig.from_pretrained(tiny)
    with pytest.raises(ValueError, match="vision_backend"):
        load_vision_encoder(config, "tensorrt")
    with pytest.raises(FileNotFoundError, match="build.export_vision"):
        load_vision_encoder(config, "onnxruntime", tmp_path / "missing.onnx")


def test_normalization_in_the_module_is_bit_exact_with_normalize_tiles(encoders):
    _, torch_encoder, _ = encoders
    module = torch_encoder.module
    pixels = _pixels(2, seed=11)
    seen = {}
    hook = module.embeddings.register_forward_pre_hook(lambda _, args: seen.setdefault("x", args[0].clone()))
    try:
        torch_encoder.encode(pixels)
    finally:
        hook.remove()
    assert torch.equal(seen["x"], torch.from_numpy(normalize_tiles(pixels)))


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_float_pixels_are_refused_with_a_clear_error(encoders, kind):
    _, torch_encoder, onnx_encoder = encoders
    encoder = torch_encoder if kind == "torch" else onnx_encoder
    with pytest.raises(TypeError, match="uint8 tiles"):
        encoder.encode(np.zeros((1, 3, 448, 448), np.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_module_keeps_norms_in_float32_and_tracks_float32(encoders, tiny, dtype):
    """The GPU path's export recipe: matmuls in fp16/bf16, normalization and norm layers in fp32."""
    config, torch_encoder, _ = encoders
    module = VisionEncoderModule.from_pretrained(config).to_compute_dtype(dtype)
    norms = [m for m in module.modules() if isinstance(m, Float32Norm)]
    assert len(norms) == 2 * config.vision.num_layers + 1  # per layer: before/after attention; projector
    assert all(p.dtype == torch.float32 for n in norms for p in n.parameters())
    assert module.mean.dtype == module.std.dtype == torch.float32
    assert {p.dtype for name, p in module.named_parameters() if ".norm." not in name} == {dtype}
    pixels = _pixels(2, seed=5)
    with torch.inference_mode():
        got = module(torch.from_numpy(pixels))
    assert got.dtype == dtype
    expected = torch.from_numpy(torch_encoder.encode(pixels))
    cosine = torch.nn.functional.cosine_similarity(got.float(), expected, dim=-1)
    assert cosine.min() > 0.999


def test_float16_onnx_export_has_float16_matmuls_and_float32_norms(tiny, tmp_path):
    import onnx

    out = export_vision_onnx(tiny, tmp_path / "vision_fp16.onnx", dtype="float16")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types[graph.input[0].name] == onnx.TensorProto.UINT8 and types[graph.output[0].name] == fp16
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    norms = [n for n in graph.node if n.op_type in ("LayerNormalization", "RMSNormalization")]
    assert matmuls and norms
    assert all(types[n.input[0]] == fp16 for n in matmuls)
    assert all(types[n.input[0]] == fp32 for n in norms)
