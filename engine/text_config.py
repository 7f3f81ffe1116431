"""The language model's config (`text_config`, or a custom checkpoint's `llm_config`), validated.

Field names and class defaults as transformers 5.23 names them: Qwen2/Qwen3/Llama, Qwen3-MoE
(`models/qwen3_moe/configuration_qwen3_moe.py`) and GPT-OSS (`models/gpt_oss/configuration_gpt_oss.py`:
`num_local_experts`, `num_experts_per_tok`, `sliding_window`, `layer_types` (default: even layers
sliding), `swiglu_limit` 7.0, `swiglu_alpha` 1.702, YaRN `rope_parameters` by default). Rotary
scaling follows `modeling_rope_utils.py` (`_compute_yarn_parameters`). What the CPU engine does not
implement is refused naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_TEXT_MODELS = ("qwen2", "qwen3", "qwen3_moe", "llama", "gpt_oss")
# Families read only from custom-format checkpoints (llm_config): transformers has no HF-native layout
# for them. InternLM2 is a Llama decoder under other weight names (engine/custom_format.py).
CUSTOM_ONLY_TEXT_MODELS = ("internlm2",)
SUPPORTED_ROPE_TYPES = ("default", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")


class ConfigError(ValueError):
    """The checkpoint cannot be served: names the field and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class YarnScaling:
    """YaRN rotary scaling: blended inverse frequencies, cos/sin multiplied by attention_factor."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    attention_factor: float


@dataclass(frozen=True, slots=True)
class TextConfig:
    model_type: str  # qwen2 | qwen3 | qwen3_moe | llama | gpt_oss | internlm2 (custom format only; Llama-shaped)
    hidden_size: int  # H
    vocab_size: int  # rows of the embedding matrix; ids ≥ this index the prompt table
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # q/k/v biases (qwen2, gpt_oss)
    qk_norm: bool  # per-head RMSNorm on q and k (qwen3, qwen3_moe)
    # Mixture of experts (qwen3_moe, gpt_oss); dense models: no sparse layers, num_experts 0.
    sparse_layers: tuple[int, ...] = ()  # layers whose MLP is the routed experts
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # width of one expert (dense layers use intermediate_size)
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1 (qwen3_moe)
    swiglu_limit: float = 0.0  # gpt_oss experts: gate ≤ limit, |up| ≤ limit
    swiglu_alpha: float = 0.0  # gpt_oss experts: glu = gate · sigmoid(alpha · gate)
    # Attention variants (gpt_oss)
    sliding_window: int = 0  # a sliding layer's query sees the last sliding_window keys, itself included
    sliding_layers: tuple[int, ...] = ()
    attention_sinks: bool = False  # a learned per-head logit joins each softmax (and takes its share)
    yarn: YarnScaling | None = None  # rotary scaling; None: the default rotary


def field(raw: dict, name: str, kind: type, where: str = "config.json"):
    if name not in raw:
        raise ConfigError(f"{where} has no {name!r}")
    value = raw[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where} {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _positive(name: str, value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} {name!r} must be a positive int, got {value!r}")
    return value


def text_config(tc: dict, where: str) -> TextConfig:
    # custom-only families arrive Llama-shaped from engine/custom_format.py, named by llm_family
    model_type = tc.get("llm_family") or tc.get("model_type")
    supported = SUPPORTED_TEXT_MODELS + (CUSTOM_ONLY_TEXT_MODELS if where == "llm_config" else ())
    if model_type not in supported:
        hint = ""
        if model_type in CUSTOM_ONLY_TEXT_MODELS:
            hint = (
                f" ({model_type} has no HF-native layout in transformers: serve the custom-format checkpoint, "
                "llm_config, as its authors ship it)"
            )
        raise ConfigError(
            f"{where}.model_type {model_type!r} is not supported by the CPU engine; "
            f"supported: {', '.join(supported)}{hint}"
        )
    if tc.get("quantization_config"):
        method = tc["quantization_config"].get("quant_method") if isinstance(tc["quantization_config"], dict) else None
        raise ConfigError(
            f"{where} 'quantization_config' ({method or 'quantized weights'}) is not supported by the CPU engine: "
            "serve unquantized (bf16/fp16/fp32) weights"
        )
    hidden = field(tc, "hidden_size", int, where)
    heads = field(tc, "num_attention_heads", int, where)
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    head_dim = int(tc.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if tc.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where} hidden_act must be 'silu', got {tc.get('hidden_act')!r}")
    num_layers = field(tc, "num_hidden_layers", int, where)
    max_positions = field(tc, "max_position_embeddings", int, where)
    rope_theta, yarn = _rope(tc, model_type, head_dim, max_positions, where)
    if model_type == "gpt_oss":
        family = _gpt_oss_fields(tc, num_layers, where)
    else:
        if tc.get("use_sliding_window"):
            raise ConfigError(f"{where} 'use_sliding_window' is true: sliding-window attention is supported for gpt_oss only")
        family = _moe_fields(tc, num_layers, where) if model_type == "qwen3_moe" else {}
    return TextConfig(
        model_type=model_type,
        hidden_size=hidden,
        vocab_size=field(tc, "vocab_size", int, where),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=field(tc, "intermediate_size", int, where),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-5 if model_type == "gpt_oss" else 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        attention_bias=bool(tc.get("attention_bias", model_type in ("qwen2", "gpt_oss"))),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        yarn=yarn,
        **family,
    )


def _rope(tc: dict, model_type: str, head_dim: int, max_positions: int, where: str) -> tuple[float, YarnScaling | None]:
    """-> (rope_theta, YaRN scaling or None), from `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling`."""
    default_theta = 150000.0 if model_type == "gpt_oss" else 10000.0
    if model_type == "gpt_oss" and not (tc.get("rope_parameters") or tc.get("rope_scaling")):
        # GptOssConfig's default rope_parameters
        tc = dict(tc, rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position_embeddings=4096))
    rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", tc.get("rope_theta", default_theta)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{where} rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where} rope 'partial_rotary_factor' {rope['partial_rotary_factor']!r} is not supported; only 1.0")
    if rope_type == "default":
        return theta, None
    original = rope.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise ConfigError(f"{where} yarn rope needs a positive int 'original_max_position_embeddings', got {original!r}")
    factor = rope.get("factor") or max_positions / original
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"{where} yarn rope 'factor' must be a number ≥ 1, got {factor!r}")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    yarn = YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(rope.get("beta_fast") or 32),
        beta_slow=float(rope.get("beta_slow") or 1),
        truncate=bool(rope.get("truncate", True)),
        attention_factor=float(attention_factor),
    )
    return theta, yarn


def _gpt_oss_fields(tc: dict, num_layers: int, where: str) -> dict:
    """GPT-OSS: every layer's MLP is the routed experts (width intermediate_size), sinks in every
    attention layer, and the layer_types' sliding layers."""
    num_experts = _positive("num_local_experts", tc.get("num_local_experts", tc.get("num_experts")), where)
    top_k = _positive("num_experts_per_tok", tc.get("num_experts_per_tok", tc.get("experts_per_token")), where)
    if top_k > num_experts:
        raise ConfigError(f"{where} 'num_experts_per_tok' {top_k} exceeds num_local_experts {num_experts}")
    window = _positive("sliding_window", tc.get("sliding_window", 128), where)
    layer_types = tc.get("layer_types")
    if layer_types is None:  # GptOssConfig's default: even layers sliding, odd layers full
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise ConfigError(f"{where} 'layer_types' must list {num_layers} of {LAYER_TYPES}, got {layer_types!r}")
    limits = {}
    for name, default in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
        value = tc.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where} {name!r} must be a positive number, got {value!r}")
        limits[name] = float(value)
    return dict(
        sparse_layers=tuple(range(num_layers)),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=field(tc, "intermediate_size", int, where),
        sliding_window=window,
        sliding_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"),
        attention_sinks=True,
        **limits,
    )


def _moe_fields(tc: dict, num_layers: int, where: str) -> dict:
    """Qwen3-MoE routing fields, validated; the sparse layers as transformers' Qwen3MoeDecoderLayer
    picks them (models/qwen3_moe/modeling_qwen3_moe.py)."""
    # transformers 5 saves num_experts under its attribute_map name num_local_experts
    num_experts = tc.get("num_experts", tc.get("num_local_experts"))
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 0:
        raise ConfigError(f"{where} 'num_experts' must be an int ≥ 0, got {num_experts!r}")
    top_k = _positive("num_experts_per_tok", tc.get("num_experts_per_tok"), where)
    if num_experts and top_k > num_experts:
        raise ConfigError(f"{where} 'num_experts_per_tok' {top_k} exceeds num_experts {num_experts}")
    step = _positive("decoder_sparse_step", tc.get("decoder_sparse_step", 1), where)
    dense = tc.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and 0 <= i < num_layers for i in dense):
        raise ConfigError(f"{where} 'mlp_only_layers' must list layer indices in [0, {num_layers}), got {dense!r}")
    norm_topk_prob = tc.get("norm_topk_prob", False)
    if not isinstance(norm_topk_prob, bool):
        raise ConfigError(f"{where} 'norm_topk_prob' must be a bool, got {norm_topk_prob!r}")
    sparse = tuple(i for i in range(num_layers) if num_experts and i not in dense and (i + 1) % step == 0)
    return dict(
        sparse_layers=sparse,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=_positive("moe_intermediate_size", tc.get("moe_intermediate_size"), where),
        norm_topk_prob=norm_topk_prob,
    )
