"""Weight precision of the CPU LLM (`llm_weights`): activations, norms and accumulation stay fp32.

float16 stores, once at load, every matrix the decoder multiplies by (attention, dense MLP, MoE
experts, the LM head) and the embedding table in float16; norms, biases, attention sinks, the MoE
routers (expert choice must not flip on rounding) and the K/V cache stay fp32. A checkpoint value
beyond float16's finite range (±65504) is refused, naming the tensor, rather than clamped:
a clamped weight silently changes the model. int8 is a later step.
"""

from __future__ import annotations

import torch

LLM_WEIGHTS = ("float32", "float16")
FP16_MAX = torch.finfo(torch.float16).max
ROUTERS = ("mlp.gate.weight", "mlp.router.weight")  # [E, H] router matrices, kept fp32


def check_llm_weights(llm_weights: str, dtype: torch.dtype) -> bool:
    """-> whether the weights are stored in float16."""
    if llm_weights not in LLM_WEIGHTS:
        raise ValueError(f"llm_weights must be one of {LLM_WEIGHTS} (int8 is not supported yet), got {llm_weights!r}")
    if llm_weights == "float16" and dtype != torch.float32:
        raise ValueError(f"llm_weights='float16' runs fp32 activations; got dtype {dtype}")
    return llm_weights == "float16"


def stored_in_half(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and not name.endswith(ROUTERS)


def check_half_range(weights: dict[str, torch.Tensor], prefix: str = "language_model.") -> None:
    """Refuses, naming the first offending tensor, values that float16 cannot hold."""
    for name, tensor in weights.items():
        if not stored_in_half(name, tensor):
            continue
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not peak <= FP16_MAX:  # also NaN
            raise ValueError(
                f"{prefix}{name} holds |values| up to {peak:.6g}, beyond float16's range (±{FP16_MAX:.0f}): "
                "serve this checkpoint with llm_weights='float32'"
            )
