"""InternViT-6B-style towers (RMSNorm, q/k RMSNorm over the whole embed dim, no q/k/v bias, layer
scale; the 38B-class models and Skywork-R1V) in the HF-native format: both vision runtimes equal
transformers' get_image_features, and the fp16 export keeps every norm, q_norm/k_norm included, in
fp32 (also for a custom-format tower; its feature parity is in tests/test_custom_format.py)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import InternVLForConditionalGeneration

from build.checkpoint import generate
from engine.config import ModelConfig
from engine.preprocess import normalize_tiles
from engine.vision import Float32Norm, OnnxVisionEncoder, TorchVisionEncoder, VisionEncoderModule
from engine.vision_export import ensure_vision_onnx, export_vision_onnx


@pytest.fixture(scope="module")
def tower_6b(tmp_path_factory):
    path = generate("tiny", "qwen2", tmp_path_factory.mktemp("vit6b") / "tiny-qwen2-6b", vision="internvit-6b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_file = ensure_vision_onnx(path, log=lambda message: None)
    config = ModelConfig.from_pretrained(path)
    return path, config, TorchVisionEncoder(config), OnnxVisionEncoder(onnx_file)


def _pixels(num_tiles: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (num_tiles, 3, 448, 448), dtype=np.uint8)


def test_checkpoint_has_the_6b_structure(tower_6b):
    path, config, torch_encoder, _ = tower_6b
    vc = json.loads((path / "config.json").read_text(encoding="utf-8"))["vision_config"]
    assert (vc["norm_type"], vc["use_qk_norm"], vc["attention_bias"]) == ("rms_norm", True, False)
    names = dict(torch_encoder.module.named_parameters())
    assert "layers.0.attention.q_norm.weight" in names and "layers.0.attention.q_proj.bias" not in names
    assert names["layers.0.attention.q_norm.weight"].shape == (vc["hidden_size"],)  # whole embed dim, not per head
    assert names["layers.0.lambda_1"].std() > 0  # layer scales differ per channel


@pytest.mark.parametrize("num_tiles", [1, 3])
def test_both_runtimes_match_transformers_image_features(tower_6b, num_tiles):
    path, _, torch_encoder, onnx_encoder = tower_6b
    pixels = _pixels(num_tiles, seed=20 + num_tiles)
    model = InternVLForConditionalGeneration.from_pretrained(path).eval()
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values=torch.from_numpy(normalize_tiles(pixels))).pooler_output
    expected = reference.reshape(-1, reference.shape[-1]).numpy()
    np.testing.assert_allclose(torch_encoder.encode(pixels), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(onnx_encoder.encode(pixels), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def custom_tower_6b(tmp_path_factory):
    path = generate("tiny", "qwen2", tmp_path_factory.mktemp("vit6b") / "custom", vision="internvit-6b", fmt="custom")
    config = ModelConfig.from_pretrained(path)
    return path, config, TorchVisionEncoder(config), None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["hf", "custom"])
def test_reduced_precision_module_keeps_every_norm_in_float32(tower_6b, custom_tower_6b, fmt, dtype):
    _, config, torch_encoder, _ = tower_6b if fmt == "hf" else custom_tower_6b
    module = VisionEncoderModule.from_pretrained(config).to_compute_dtype(dtype)
    layers = config.vision.num_layers
    for layer in module.layers:
        for norm in (layer.layernorm_before, layer.layernorm_after, layer.attention.q_norm, layer.attention.k_norm):
            assert isinstance(norm, Float32Norm) and norm.norm.weight.dtype == torch.float32
    assert sum(isinstance(m, Float32Norm) for m in module.modules()) == 4 * layers + 1  # + the projector's
    pixels = _pixels(2, seed=8)
    with torch.inference_mode():
        got = module(torch.from_numpy(pixels))
    expected = torch.from_numpy(torch_encoder.encode(pixels))
    assert torch.nn.functional.cosine_similarity(got.float(), expected, dim=-1).min() > 0.999


def test_float16_onnx_export_computes_every_norm_in_float32(tower_6b, tmp_path):
    import onnx
    import onnxruntime as ort

    path, config, torch_encoder, _ = tower_6b
    out = export_vision_onnx(path, tmp_path / "vision_fp16.onnx", dtype="float16")
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types[n.input[0]] == fp16 for n in matmuls)
    # opset 18 has no RMSNormalization: each RMSNorm is Pow → ReduceMean → … (4 per layer)
    rms = [n for n in graph.node if n.op_type in ("Pow", "ReduceMean")]
    assert len(rms) == 2 * 4 * config.vision.num_layers
    assert all(types[n.input[0]] == fp32 for n in rms)
    layer_norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert len(layer_norms) == 1 and types[layer_norms[0].input[0]] == fp32  # the projector's

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pixels = _pixels(2, seed=9)
    got = torch.from_numpy(session.run(None, {"pixel_values": pixels})[0].astype(np.float32))
    expected = torch.from_numpy(torch_encoder.encode(pixels))
    assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.999
