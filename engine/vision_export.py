"""The vision encoder (ViT → pixel shuffle → projector) as ONNX with a dynamic tiles axis, and the
cached graphs the ONNX Runtime backend loads (the float32 export, or its int8 quantization:
engine/vision_precision.py; made on first use, reused while their stamps hold).

Output `prompt_embedding_table` [T·Q, H] float32 for input `pixel_values` [T, 3, S, S] uint8 (RGB
tiles; the graph starts with the ImageNet normalization), T dynamic; an InternVL3.5-Flash graph also
outputs `compressed_embedding_table` [T·q, H] and `compress_probability` [T] (engine/flash.py routes). The GPU path compiles the
`--ragged` variant to a TensorRT plan: input flat [T·3·S·S] (how Triton's TensorRT backend hands a
model a ragged batch of requests), output [T, Q, H] (so Triton can scatter it back per request).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.vision import FLASH_OUTPUTS, ONNX_INPUT, ONNX_OUTPUT, default_onnx_path, vision_module
from engine.vision_precision import check_vision_precision, onnx_file_name, quantization_stamp, quantize_graph

OPSET = 18
EXTERNAL_DATA_BYTES = 1.8e9  # weights above this go to <graph>.data beside it: protobuf's 2 GB limit
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GRAPH_SOURCES = (
    "engine/vision.py",
    "engine/vision_flash.py",
    "engine/vision_export.py",
    "engine/custom_format.py",
    "engine/config.py",
    "engine/weights.py",
)
logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise


def export_stamp(checkpoint: str | Path) -> dict:
    """What an exported ONNX depends on: the checkpoint's files and the graph's code (and torch).
    A cached export is valid while this is unchanged."""
    path = Path(checkpoint).resolve()
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for name in _GRAPH_SOURCES:
        digest.update((root / name).read_bytes())
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return {
        "checkpoint": str(path),
        "files": {f.name: f.stat().st_mtime_ns for f in files},
        "vision_graph": digest.hexdigest()[:16],
    }


def export_vision_onnx(
    checkpoint: str | Path, out: str | Path | None = None, dtype: str = "float32", ragged: bool = False
) -> Path:
    """dtype float16 / bfloat16: the graph for TensorRT's strongly typed build (matmuls in dtype, the
    input normalization and the norm layers in float32; output in dtype). The CPU path uses float32.
    ragged: flat uint8 input [T·3·S·S] -> [T, Q, H] (VisionEncoderModule.forward)."""
    config = ModelConfig.from_pretrained(checkpoint)
    if config.flash is not None and ragged:
        raise ValueError("no ragged (GPU) graph for InternVL3.5-Flash checkpoints: the GPU path does not serve them yet (docs/GPU.md)")
    out = Path(out) if out else default_onnx_path(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = vision_module(config).to_compute_dtype(DTYPES[dtype])
    size = config.vision.image_size
    tiles = torch.export.Dim("tiles", min=1, max=4096)
    if ragged:
        example, dynamic = torch.zeros(2 * 3 * size * size, dtype=torch.uint8), {0: 3 * size * size * tiles}
    else:
        example, dynamic = torch.zeros(2, 3, size, size, dtype=torch.uint8), {0: tiles}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[ONNX_INPUT],
            output_names=list(FLASH_OUTPUTS) if config.flash else [ONNX_OUTPUT],
            dynamic_shapes={ONNX_INPUT: dynamic},
            opset_version=OPSET,
            verbose=False,
        )
    _read_shapes_after_the_cast(program.model.graph)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with _staged(out) as staged:
        program.save(staged, external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    return out


def quantize_vision_onnx(fp32_file: str | Path, out: str | Path) -> Path:
    """The int8 graph (engine/vision_precision.py) of a float32 export, written whole at `out`."""
    out = Path(out)
    with _staged(out) as staged:
        quantize_graph(fp32_file, staged)
    return out


@contextmanager
def _staged(out: Path) -> Iterator[str]:
    """A path to write `out` to, in a fresh folder beside it; afterwards everything written there is
    renamed into place, a data file (named in the graph, relative) before the graph, so whoever sees
    the graph sees both complete."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as staging:
        yield os.path.join(staging, out.name)
        for name in sorted(os.listdir(staging), key=lambda name: name == out.name):
            os.replace(os.path.join(staging, name), out.parent / name)


def _read_shapes_after_the_cast(graph) -> None:
    """TensorRT accepts a uint8 network input only as the input of a Cast; the exporter also reads
    the tiles count with Shape(pixel_values). Shape(Cast(pixel_values)) is the same value."""
    (pixels,) = graph.inputs
    uses = list(pixels.uses())
    casts = [node for node, _ in uses if node.op_type == "Cast"]
    if len(casts) != 1 or any(node.op_type not in ("Cast", "Shape") for node, _ in uses):
        raise RuntimeError(f"unexpected consumers of {pixels.name}: {[node.op_type for node, _ in uses]}")
    for node, index in uses:
        if node.op_type == "Shape":
            node.replace_input_with(index, casts[0].outputs[0])


def vision_stamp(checkpoint: str | Path, precision: str = "float32") -> dict:
    """The stamp of the graph of `precision`: the float32 export's, plus how int8 quantizes it."""
    stamp = export_stamp(checkpoint)
    return stamp if check_vision_precision(precision) == "float32" else {**stamp, "quantization": quantization_stamp()}


def ensure_vision_onnx(
    checkpoint: str | Path, log=lambda message: print(message, file=sys.stderr, flush=True), precision: str = "float32"
) -> Path:
    """The checkpoint's ONNX of `precision` (engine/vision_precision.py), made on first use:
    <checkpoint>/onnx/vision_encoder[.int8].onnx, or, when the checkpoint folder is not writable (a
    shared model store), a per-user cache folder keyed by the graph's stamp. Made again when the
    checkpoint or the graph's code changed; the int8 graph is quantized from the float32 one, itself
    ensured first. Concurrent first uses (threads or processes) make it once: the others wait on a
    file lock beside the graph and reuse it; the graph, its data file and the stamp appear whole or
    not at all."""
    stamp = vision_stamp(checkpoint, precision)
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "internvl-serve" / "vision" / key
    name = onnx_file_name(precision)
    places = (default_onnx_path(checkpoint).with_name(name), cache / name)
    for onnx_file in places:
        if _is_current(onnx_file, stamp):
            return onnx_file
    for onnx_file in places:
        existing = next(p for p in (onnx_file.parent, *onnx_file.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            continue
        onnx_file.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(onnx_file.with_suffix(".lock")):
            if _is_current(onnx_file, stamp):  # another thread or process made it meanwhile
                return onnx_file
            if precision == "float32":
                log(f"exporting the vision encoder to {onnx_file} (first use; reused until the checkpoint changes) ...")
                started = time.perf_counter()
                export_vision_onnx(checkpoint, onnx_file)
            else:
                fp32_file = ensure_vision_onnx(checkpoint, log)
                log(f"quantizing the vision encoder to {precision}: {onnx_file} (first use; reused until the checkpoint changes) ...")
                started = time.perf_counter()
                quantize_vision_onnx(fp32_file, onnx_file)
            _write_atomically(onnx_file.with_suffix(".stamp.json"), json.dumps(stamp))
            log(f"{'exported' if precision == 'float32' else 'quantized'} in {time.perf_counter() - started:.1f} s")
            return onnx_file
    raise PermissionError(f"cannot write the vision ONNX next to {checkpoint} nor to {cache}")


def _is_current(onnx_file: Path, stamp: dict) -> bool:
    stamp_file = onnx_file.with_suffix(".stamp.json")
    return onnx_file.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp


@contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One exporter at a time across threads and processes; the kernel releases the lock when the
    file closes, also when its process dies."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_atomically(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)
