"""Vision encoder: normalize → InternViT → drop CLS → pixel shuffle → MLP projector, as one module
and two runtimes.

Both runtimes map `pixel_values` [T, 3, S, S] uint8 (the tiles' RGB values,
`load_images(normalize=False)`) to the prompt table [T·Q, H] float32: `TorchVisionEncoder` runs the
module eagerly, `OnnxVisionEncoder` runs its ONNX export (engine/vision_export.py; made on first use
when no file is given) with ONNX Runtime on the CPU. InternVL3.5-Flash checkpoints (`flash_mode`)
run engine/vision_flash.py's module, whose three outputs (both paths' features and the gate) are
routed per request by engine/flash.py: `encode_request` also returns each tile's token count. The ImageNet normalization is the module's first step, so tiles cross process and
device boundaries as uint8 (4× fewer bytes than float32).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import InternVLConfig, InternVLVisionModel
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from engine.config import ModelConfig, VisionConfig, read_config
from engine.flash import FlashConfig, assemble
from engine.preprocess import IMAGENET_MEAN, IMAGENET_STD
from engine.vision_precision import check_vision_precision
from engine.weights import load_weights

ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "prompt_embedding_table"
# ONNX Runtime encodes one tile per run, whatever a Triton batch brings. InternViT-300M, the 9 tiles of
# a 1280x720 image, 2 threads (python -m bench_components --only vision_runs, 2026-12-08): fp32 1.17x
# and int8 1.12x the tiles/s of one run of all 9, and no run meets a new input shape, whose first run
# is the slow one (all 9 in one run: 78.5 s the first time; one per run: 47.4 s). The int8 graph's
# dynamic activation scales then cover one tile, so a request's features do not depend on the other
# requests in its Triton batch.
TILES_PER_RUN = 1
# a Flash graph's outputs: the 256-token table, the 64-token one, the gate
FLASH_OUTPUTS = (ONNX_OUTPUT, "compressed_embedding_table", "compress_probability")


def pixel_shuffle(x: torch.Tensor, scale: int, ps_version: str = "v2") -> torch.Tensor:
    # x: [T, side, side, C] -> [T, side/scale, side/scale, C·scale²]; tokens row-major ("v2"), or
    # column-major ("v1": InternVLChatModel.pixel_shuffle leaves out the final swap, a transposed grid)
    t, rows, cols, c = x.shape
    x = x.reshape(t, rows, cols // scale, c * scale).transpose(1, 2)
    x = x.reshape(t, cols // scale, rows // scale, c * scale * scale)
    return (x if ps_version == "v1" else x.transpose(1, 2)).contiguous()


class Float32Norm(nn.Module):
    """A normalization layer computed in float32 inside a reduced-precision encoder: in fp16 the
    variance overflows (TensorRT-LLM issue #3223: a ViT built in plain fp16 gave cosine 0.14 against
    PyTorch; a strongly typed engine that keeps the norms in fp32 gave 0.9997)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


class VisionEncoderModule(nn.Module):
    def __init__(self, tower: InternVLVisionModel, projector: nn.Module, config: VisionConfig):
        super().__init__()
        self.embeddings = tower.embeddings
        self.layers = nn.ModuleList(tower.encoder.layer[: config.num_layers])
        self.final_norm = tower.layernorm if config.final_layernorm else nn.Identity()
        self.projector = projector
        self.image_size = config.image_size
        self.side = config.image_size // config.patch_size
        self.scale = round(1 / config.downsample_ratio)
        self.ps_version = config.ps_version
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.compute_dtype = torch.float32

    def to_compute_dtype(self, dtype: torch.dtype) -> VisionEncoderModule:
        """Weights and activations in `dtype` (fp16 / bf16, for TensorRT's strongly typed build);
        the input normalization and every norm layer stay float32."""
        if dtype == torch.float32:
            return self
        norms = [(parent, name, child) for parent in self.modules() for name, child in parent.named_children() if _is_norm(child)]
        self.to(dtype)
        for parent, name, child in norms:
            setattr(parent, name, Float32Norm(child))
        self.mean, self.std = self.mean.float(), self.std.float()
        self.compute_dtype = dtype
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: uint8 [T, 3, S, S] -> features: [T·Q, H] in compute_dtype, or
        # pixel_values: uint8 [T·3·S·S] (a ragged batch: Triton's TensorRT backend concatenates the
        #               requests' tiles flat) -> features: [T, Q, H], so Triton can scatter them back
        grid = self.patch_grid(pixel_values)
        features = self.project(grid, self.scale, self.projector)
        return features.reshape(grid.shape[0], -1, features.shape[-1]) if pixel_values.dim() == 1 else features

    def patch_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: uint8 [T, 3, S, S] or flat [T·3·S·S] -> the tower's patch tokens [T, side, side, C]
        x = pixel_values.to(torch.float32)  # first op: TensorRT wants a uint8 input to feed a Cast
        x = x.reshape(-1, 3, self.image_size, self.image_size)
        tiles = x.shape[0]
        # torchvision's ToTensor + Normalize float32 ops in their order (engine.preprocess.normalize_tiles)
        x = (x / 255 - self.mean) / self.std
        x = self.embeddings(x.to(self.compute_dtype))
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)[:, 1:].reshape(tiles, self.side, self.side, -1)  # CLS dropped

    def project(self, grid: torch.Tensor, scale: int, projector: nn.Module) -> torch.Tensor:
        # grid: [T, side, side, C] -> [T·(side/scale)², H]: pixel shuffle, then the projector
        x = pixel_shuffle(grid, scale, self.ps_version)
        return projector(x.reshape(-1, x.shape[-1]))

    @classmethod
    def from_pretrained(cls, config: ModelConfig) -> VisionEncoderModule:
        raw, custom = read_config(config.path)  # a custom checkpoint's fields under HF-native names
        hf_config = InternVLConfig.from_dict(raw)
        hf_config.vision_config._attn_implementation = "sdpa"
        tower = InternVLVisionModel(hf_config.vision_config)
        tower.load_state_dict(load_weights(config.path, "vision_tower."))
        if custom:  # InternAttention's q_norm/k_norm use layer_norm_eps; transformers' fix 1e-6
            for layer in tower.encoder.layer:
                for norm in (layer.attention.q_norm, layer.attention.k_norm):
                    if hasattr(norm, "variance_epsilon"):
                        norm.variance_epsilon = hf_config.vision_config.layer_norm_eps
        projector = InternVLMultiModalProjector(hf_config)
        projector.load_state_dict(load_weights(config.path, "multi_modal_projector."))
        return cls(tower, projector, config.vision).eval()


def vision_module(config: ModelConfig) -> VisionEncoderModule:
    if config.flash is None:
        return VisionEncoderModule.from_pretrained(config)
    from engine.vision_flash import FlashVisionEncoderModule  # it imports this module

    return FlashVisionEncoderModule.from_pretrained(config).add_router(config)


class _RequestEncoder:
    """Routing on top of a runtime's `run(pixel_values) -> graph outputs`."""

    flash: FlashConfig | None

    def encode_request(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One request's tiles -> (prompt table [T·Q, H] float32, tokens per tile int32 [T]: Q, or q
        for a tile a Flash router compressed)."""
        return self.encode_requests([pixel_values])[0]

    def encode_requests(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Several requests' tiles (each ≥ 1 tile) in one run; each request is routed on its own."""
        counts = [len(p) for p in requests]
        outputs = self.run(requests[0] if len(requests) == 1 else np.concatenate(requests))
        total, results, start = sum(counts), [], 0
        for n in counts:
            parts = [o[start * (len(o) // total) : (start + n) * (len(o) // total)] for o in outputs]
            if self.flash is not None:
                results.append(assemble(*parts, self.flash))
            else:
                results.append((parts[0], np.full(n, len(parts[0]) // n, np.int32)))
            start += n
        return results

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        # pixel_values: uint8 [T, 3, S, S] (one request) -> [T·Q, H] float32
        return self.encode_request(pixel_values)[0]


class TorchVisionEncoder(_RequestEncoder):
    def __init__(self, config: ModelConfig):
        self.module = vision_module(config)
        self.flash = config.flash

    @torch.inference_mode()
    def run(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        out = self.module(torch.from_numpy(_check_tiles(pixel_values)))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


class OnnxVisionEncoder(_RequestEncoder):
    def __init__(
        self,
        onnx_file: str | Path,
        threads: int | None = None,
        spin: bool = False,
        flash: FlashConfig | None = None,
        tiles_per_run: int | None = TILES_PER_RUN,  # None: every input in one run
    ):
        import onnxruntime as ort

        if not Path(onnx_file).is_file():
            raise FileNotFoundError(
                f"{onnx_file} not found: export it with `python -m build.export_vision --model <checkpoint> --out {onnx_file}`, "
                "or leave vision_onnx unset to export on first use"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # By default worker threads sleep when a run ends instead of spinning for the next one: what
        # follows an encode is the LLM's prefill (here or in another Triton stub) on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # The CPU arena keeps every block it ever allocated, a multiple of the largest run's activations:
        # a Triton vision instance that ran 8 requests × 26 tiles once held ~12 GiB (soak, issue 13).
        options.enable_cpu_mem_arena = False
        self.tiles_per_run = tiles_per_run
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        if self.session.get_inputs()[0].type != "tensor(uint8)":
            raise ValueError(
                f"{onnx_file} takes float pixel_values (exported by an older version); "
                "re-export it with `python -m build.export_vision --model <checkpoint>`"
            )
        self.flash = flash
        self.outputs = list(FLASH_OUTPUTS if flash else (ONNX_OUTPUT,))
        found = [o.name for o in self.session.get_outputs()]
        if found != self.outputs:
            raise ValueError(f"{onnx_file} has outputs {found}, this checkpoint's encoder needs {self.outputs}: re-export it")

    def run(self, pixel_values: np.ndarray) -> list[np.ndarray]:
        # pixel_values: uint8 [T, 3, S, S] -> the graph's outputs (tiles of any number of requests; every
        # output's first axis runs over the tiles, so chunks concatenate)
        tiles = _check_tiles(pixel_values)
        step = self.tiles_per_run or len(tiles)
        runs = [self.session.run(self.outputs, {ONNX_INPUT: tiles[i : i + step]}) for i in range(0, len(tiles), step)]
        return runs[0] if len(runs) == 1 else [np.concatenate(parts) for parts in zip(*runs)]


def _check_tiles(pixel_values: np.ndarray) -> np.ndarray:
    if pixel_values.dtype != np.uint8:
        raise TypeError(f"pixel_values must be uint8 tiles (load_images(..., normalize=False)), got {pixel_values.dtype}")
    return pixel_values


def default_onnx_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint) / "onnx" / "vision_encoder.onnx"


def load_vision_encoder(config: ModelConfig, backend: str, onnx_file: str | Path | None = None, precision: str = "float32"):
    """precision (engine/vision_precision.py): of the graph made on first use when no onnx_file is
    given; int8 is an ONNX Runtime graph."""
    check_vision_precision(precision)
    if precision != "float32" and (backend != "onnxruntime" or onnx_file is not None):
        raise ValueError(
            f"vision_precision={precision!r} is the ONNX Runtime graph quantized on first use: "
            "use vision_backend='onnxruntime' without vision_onnx (which loads the graph it names as it is)"
        )
    if backend == "torch":
        return TorchVisionEncoder(config)
    if backend == "onnxruntime":
        if onnx_file is None:
            from engine.vision_export import ensure_vision_onnx  # it imports this module

            onnx_file = ensure_vision_onnx(config.path, precision=precision)
        return OnnxVisionEncoder(onnx_file, flash=config.flash)
    raise ValueError(f"vision_backend must be 'onnxruntime' or 'torch', got {backend!r}")
