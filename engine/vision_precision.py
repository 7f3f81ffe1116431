"""Precision of the CPU vision encoder's ONNX graph (`vision_precision`): float32, the default, or int8.

int8 is ONNX Runtime's dynamic quantization of the exported float32 graph (engine/vision_export.py
caches it beside that graph, under its own stamp): the weights of every MatMul with a constant
operand (attention and MLP projections, the projector) stored as int8 with one scale per output
channel, their activations quantized to uint8 on each run (MatMulInteger). Everything else stays
float32: the input normalization, LayerNorm, Softmax, GELU, and attention's QK^T and AV products,
whose operands are both activations. Accuracy gates: tests/test_vision_precision.py; speed and
error at the InternViT-300M shape: docs/PERFORMANCE.md. The GPU path compiles its own fp16/bf16
graph to TensorRT and refuses int8 (build/repository.py).

Importing this module stays cheap (build/settings.py reads VISION_PRECISIONS): onnxruntime is
imported where a graph is quantized.
"""

from __future__ import annotations

from pathlib import Path

VISION_PRECISIONS = ("float32", "int8")
# quantize_dynamic's arguments; part of the int8 graph's stamp, so a change re-quantizes
QUANTIZATION = {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": False, "weight_type": "QInt8"}


def check_vision_precision(precision: str) -> str:
    if precision not in VISION_PRECISIONS:
        raise ValueError(f"vision_precision must be one of {VISION_PRECISIONS}, got {precision!r}")
    return precision


def onnx_file_name(precision: str) -> str:
    return "vision_encoder.onnx" if check_vision_precision(precision) == "float32" else f"vision_encoder.{precision}.onnx"


def quantization_stamp() -> dict:
    """What the int8 graph depends on beyond its float32 source: the settings and the quantizer."""
    import onnxruntime

    return {"precision": "int8", "settings": QUANTIZATION, "onnxruntime": onnxruntime.__version__}


def quantize_graph(fp32_file: str | Path, out: str | Path) -> None:
    """Writes the int8 graph of the float32 graph `fp32_file` to `out` (with `<out>.data` beside it
    when the float32 weights were stored beside their graph, as a > 1.8 GB export's are)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = Path(f"{fp32_file}.data").is_file()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "Please consider to run pre-processing": ORT's optimizer fuses at load
    try:
        quantize_dynamic(
            str(fp32_file),
            str(out),
            op_types_to_quantize=QUANTIZATION["op_types_to_quantize"],
            per_channel=QUANTIZATION["per_channel"],
            reduce_range=QUANTIZATION["reduce_range"],
            weight_type=getattr(QuantType, QUANTIZATION["weight_type"]),
            use_external_data_format=external,
        )
    finally:
        root.setLevel(level)
