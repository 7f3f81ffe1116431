"""Rotary position tables: the default rotary, or YaRN (GPT-OSS; long-context Qwen configs).

Follows transformers 5.23 `modeling_rope_utils.py`: `_compute_default_rope_parameters` and
`_compute_yarn_parameters` (inverse frequencies blended between interpolation and extrapolation by a
linear ramp over the correction range of beta_fast/beta_slow rotations; cos and sin multiplied by the
attention factor, in float32, then cast).
"""

from __future__ import annotations

import math

import torch

from engine.text_config import TextConfig


def inverse_frequencies(config: TextConfig) -> torch.Tensor:
    # -> float32 [head_dim / 2]
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    yarn = config.yarn
    if yarn is None:
        return 1.0 / (base**exponents)
    pos_freqs = base**exponents

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as the reference: avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_tables(config: TextConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # -> cos, sin [max_position_embeddings, head_dim] (the half-dim angles repeated, rotate_half style)
    freqs = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float32), inverse_frequencies(config))
    angles = torch.cat((freqs, freqs), dim=-1)
    scale = 1.0 if config.yarn is None else config.yarn.attention_factor
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)
