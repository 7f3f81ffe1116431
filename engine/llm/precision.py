"""Weight precision of the CPU LLM (`llm_weights`): activations, norms and accumulation stay fp32.

float16 stores, once at load, every matrix the decoder multiplies by (attention, dense MLP, MoE
experts, the LM head) and the embedding table in float16; norms, biases, attention sinks, the MoE
routers (expert choice must not flip on rounding) and the K/V cache stay fp32. A checkpoint value
beyond float16's finite range (±65504) is refused, naming the tensor, rather than clamped:
a clamped weight silently changes the model.

int8 stores the same matrices (and the embedding table) as int8 rows with one fp32 scale per row
(engine/llm/int8.py). It needs the compiled AVX2 kernel; where that cannot be built, the model is
served in float16 with a warning.
"""

from __future__ import annotations

import torch

LLM_WEIGHTS = ("float32", "float16", "int8")
FP16_MAX = torch.finfo(torch.float16).max
ROUTERS = ("mlp.gate.weight", "mlp.router.weight")  # [E, H] router matrices, kept fp32


def check_llm_weights(llm_weights: str, dtype: torch.dtype) -> None:
    if llm_weights not in LLM_WEIGHTS:
        raise ValueError(f"llm_weights must be one of {LLM_WEIGHTS}, got {llm_weights!r}")
    if llm_weights != "float32" and dtype != torch.float32:
        raise ValueError(f"llm_weights={llm_weights!r} runs fp32 activations; got dtype {dtype}")


def stored_weights(llm_weights: str, dtype: torch.dtype) -> str:
    """-> the precision the matrices are stored in: llm_weights, or float16 where int8 has no kernel."""
    check_llm_weights(llm_weights, dtype)
    if llm_weights == "int8":
        from engine.llm.int8 import int8_available

        return "int8" if int8_available() else "float16"
    return llm_weights


def stored_reduced(name: str, tensor: torch.Tensor) -> bool:
    """Whether a float16/int8 model stores this tensor in its reduced precision."""
    return tensor.dim() >= 2 and not name.endswith(ROUTERS)


def check_half_range(weights: dict[str, torch.Tensor], prefix: str = "language_model.") -> None:
    """Refuses, naming the first offending tensor, values that float16 cannot hold."""
    for name, tensor in weights.items():
        if not stored_reduced(name, tensor):
            continue
        peak = float(tensor.abs().max()) if tensor.numel() else 0.0
        if not peak <= FP16_MAX:  # also NaN
            raise ValueError(
                f"{prefix}{name} holds |values| up to {peak:.6g}, beyond float16's range (±{FP16_MAX:.0f}): "
                "serve this checkpoint with llm_weights='float32'"
            )
