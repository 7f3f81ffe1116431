"""InternVL's custom ("GitHub") checkpoint format, read as the HF-native one without conversion.

`InternVLChatModel` (`model_type` internvl_chat) and Skywork's `SkyworkR1VChatModel` (skywork_chat, the
same layout) store `config.json` with `llm_config`, `vision_config` (InternViT) and the chat fields,
and weights `vision_model.*`, `mlp1.*`, `language_model.*`. Followed:
- OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py
  (InternVLChatConfig: the field names and class defaults), configuration_intern_vit.py
  (InternVisionConfig defaults), modeling_internvl_chat.py (extract_feature: select_layer over
  hidden_states, drop CLS, pixel_shuffle by ps_version, mlp1), modeling_intern_vit.py (no final
  norm after the encoder; q_norm/k_norm are RMSNorm with layer_norm_eps whatever norm_type is);
- transformers' models/internvl/convert_internvl_weights_to_hf.py (weight names, the attn.qkv split
  into thirds, qk_normalization → use_qk_norm, qkv_bias → attention_bias, the InternLM2 → Llama names);
- internvl_chat/internvl/model/internlm2/configuration_internlm2.py and modeling_internlm2.py
  (InternLM2ForCausalLM, the language model of InternVL2.5-2B/8B/26B and InternVL3-9B): a Llama
  decoder under other names with one fused `attention.wqkv` grouped per kv head — rows
  (kv_heads, groups + 2, head_dim): the group's query heads, then its key head, then its value head;
  head_dim = hidden_size // num_attention_heads; `bias` (class default true) on wqkv and wo;
  rope_scaling {type linear|dynamic, factor} (dynamic NTK only rescales beyond max_position_embeddings,
  e.g. InternLM2.5-7B's {dynamic, 2.0}); rope_pos_id_version 'v2pe' (V2PE positions).
  transformers has no InternLM2 model, so there is no HF-native InternLM2 layout: InternLM2 is read
  from custom checkpoints only, and engine/weights.py maps its names to the Llama ones.
"""

from __future__ import annotations

import torch

from engine.config import ConfigError

MODEL_TYPES = ("internvl_chat", "skywork_chat")
PS_VERSIONS = ("v1", "v2")
# (InternLM2, Llama) name pieces of the decoder (language_model.*); wqkv is split by split_wqkv.
_INTERNLM2_NAMES = (
    ("language_model.output.", "language_model.lm_head."),
    (".tok_embeddings.", ".embed_tokens."),
    (".attention.wqkv.", ".self_attn.wqkv."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)

# (custom, HF-native) name pieces, in the converter's order (ORIGINAL_TO_CONVERTED_KEY_MAPPING_VISION
# / _MULTI); attn.proj comes before attn so the inverse renames projection_layer first.
_VISION_NAMES = (
    ("vision_model.", "vision_tower."),
    (".encoder.layers.", ".encoder.layer."),
    (".embeddings.class_embedding", ".embeddings.cls_token"),
    (".embeddings.position_embedding", ".embeddings.position_embeddings"),
    (".embeddings.patch_embedding.", ".embeddings.patch_embeddings.projection."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.", ".attention."),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
)
_PROJECTOR_NAMES = (
    ("mlp1.0.", "multi_modal_projector.layer_norm."),
    ("mlp1.1.", "multi_modal_projector.linear_1."),
    ("mlp1.3.", "multi_modal_projector.linear_2."),
)


def is_custom(raw: dict) -> bool:
    return raw.get("model_type") in MODEL_TYPES or "llm_config" in raw


def hf_name(key: str) -> str:
    """A custom vision / projector weight name under its HF-native name (attn.qkv stays fused:
    split_qkv splits the tensor)."""
    return _rename(key, forward=True)


def llama_name(key: str) -> str:
    """An InternLM2 decoder weight name (language_model.*) under the Llama name (attention.wqkv becomes
    self_attn.wqkv, still fused: split_wqkv splits the tensor); other names pass through."""
    return _replace_pieces(key, _INTERNLM2_NAMES, forward=True) if key.startswith("language_model.") else key


def internlm2_name(key: str) -> str:
    """The inverse of llama_name (build/checkpoint.py writes InternLM2 checkpoints with it)."""
    return _replace_pieces(key, _INTERNLM2_NAMES, forward=False) if key.startswith("language_model.") else key


def wqkv_layout(llm_config: dict) -> tuple[int, int, int]:
    """-> (num_key_value_heads, query heads per kv head, head_dim) of an InternLM2 llm_config."""
    heads = llm_config["num_attention_heads"]
    kv_heads = llm_config.get("num_key_value_heads") or heads
    return kv_heads, heads // kv_heads, llm_config["hidden_size"] // heads


def split_wqkv(name: str, tensor: torch.Tensor, layout: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    # self_attn.wqkv.{weight [(kv·(g+2)·d), H], bias} -> q_proj / k_proj / v_proj, as
    # InternLM2Attention.forward rearranges 'b q (h gs d) -> b q h gs d' (gs = groups + 2)
    base, _, leaf = name.rpartition(".")
    if not base.endswith("self_attn.wqkv"):
        return {name: tensor}
    kv_heads, groups, head_dim = layout
    grouped = tensor.reshape(kv_heads, groups + 2, head_dim, *tensor.shape[1:])
    stem = base[: -len("wqkv")]
    return {
        f"{stem}q_proj.{leaf}": grouped[:, :groups].reshape(kv_heads * groups * head_dim, *tensor.shape[1:]),
        f"{stem}k_proj.{leaf}": grouped[:, -2].reshape(kv_heads * head_dim, *tensor.shape[1:]),
        f"{stem}v_proj.{leaf}": grouped[:, -1].reshape(kv_heads * head_dim, *tensor.shape[1:]),
    }


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of split_wqkv: q/k/v projections (weights or biases) -> the grouped wqkv tensor."""
    kv_heads, groups, head_dim = layout
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(kv_heads, groups, head_dim, *rest), k.reshape(kv_heads, 1, head_dim, *rest), v.reshape(kv_heads, 1, head_dim, *rest)],
        dim=1,
    )
    return grouped.reshape(kv_heads * (groups + 2) * head_dim, *rest)


def internlm2_text_config(llm: dict) -> dict:
    """An InternLM2 llm_config (InternLM2Config's field names and defaults) as the Llama-shaped fields
    engine/config.py reads; what the CPU engine does not implement is refused naming the field."""
    where = "llm_config"
    bias = llm.get("bias", True)  # InternLM2Config's default
    if bias is not False:
        raise ConfigError(
            f"{where}.model_type 'internlm2' with {where} 'bias' {bias!r} (biases on wqkv and wo; InternLM2Config's "
            "default when absent is true) is not supported by the CPU engine; only 'bias': false"
        )
    scaling = llm.get("rope_scaling")
    if scaling is not None:
        # InternLM2DynamicNTKScalingRotaryEmbedding changes the base only for sequences longer than
        # max_position_embeddings, which the engine never runs (prompt + output are capped there): within
        # them it is the default rotary exactly. Linear scaling divides every position: not implemented.
        factor = scaling.get("factor") if isinstance(scaling, dict) else None
        if not isinstance(scaling, dict) or scaling.get("type") != "dynamic" or not isinstance(factor, (int, float)) or factor < 1:
            raise ConfigError(
                f"{where} 'rope_scaling' {scaling!r} is not supported for internlm2; supported: null, or "
                "{'type': 'dynamic', 'factor': ≥ 1} (exact within max_position_embeddings); linear scaling is not implemented"
            )
    version = llm.get("rope_pos_id_version", "default")
    if version != "default":
        raise ConfigError(f"{where} 'rope_pos_id_version' {version!r} (V2PE positions) is not supported; only 'default'")
    heads, hidden = llm.get("num_attention_heads"), llm.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
        raise ConfigError(f"{where} 'hidden_size' {hidden} is not a multiple of num_attention_heads {heads}")
    text = {k: v for k, v in llm.items() if k not in ("bias", "rope_scaling", "head_dim", "rope_parameters", "auto_map")}
    text.update(
        # a Llama config to transformers (engine/vision.py builds InternVLConfig from this view, and
        # transformers knows no internlm2); engine/config.py reads the family from llm_family
        model_type="llama",
        llm_family="internlm2",
        architectures=["LlamaForCausalLM"],
        attention_bias=False,
        head_dim=hidden // heads if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 else None,
        rope_theta=llm.get("rope_theta", 10000),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        hidden_act=llm.get("hidden_act", "silu"),
    )
    return text


def custom_name(key: str) -> str:
    """The inverse of hf_name (build/checkpoint.py writes custom checkpoints with it)."""
    return _rename(key, forward=False)


def _replace_pieces(key: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> str:
    """Each (a, b) piece of `pairs` replaced once, a -> b (forward) or b -> a, in order."""
    src, dst = (0, 1) if forward else (1, 0)
    for pair in pairs:
        key = key.replace(pair[src], pair[dst], 1)
    return key


def _rename(key: str, forward: bool) -> str:
    src, dst = (0, 1) if forward else (1, 0)
    if key.startswith(_VISION_NAMES[0][src]):
        return _replace_pieces(key, _VISION_NAMES, forward)
    for pair in _PROJECTOR_NAMES:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]) :]
    return key


def split_qkv(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    # attention.qkv.{weight [3C, C], bias [3C]} -> q_proj / k_proj / v_proj (rows in q, k, v order)
    base, _, leaf = name.rpartition(".")
    if not base.endswith("attention.qkv"):
        return {name: tensor}
    stem = base[: -len("qkv")]
    return {f"{stem}{p}_proj.{leaf}": t for p, t in zip("qkv", tensor.chunk(3))}


def hf_view(raw: dict) -> dict:
    """A custom config.json as the HF-native fields engine/config.py reads (validated here where the
    custom field names differ, so errors name them); `ps_version` and `force_image_size` ride along."""
    llm = raw.get("llm_config")
    if not isinstance(llm, dict):
        raise ConfigError(f"config.json of a {raw.get('model_type', 'custom')} checkpoint needs an 'llm_config' object, got {llm!r}")
    vc = raw.get("vision_config")
    if not isinstance(vc, dict):
        raise ConfigError(f"config.json of a {raw.get('model_type', 'custom')} checkpoint needs a 'vision_config' object, got {vc!r}")
    if llm.get("model_type") == "internlm2":
        llm = internlm2_text_config(llm)
    for name in ("use_backbone_lora", "use_llm_lora"):
        if raw.get(name):
            raise ConfigError(f"config.json {name!r} is {raw[name]!r}: merge the LoRA weights first")

    ps_version = raw.get("ps_version", "v1")  # InternVLChatConfig's default
    if ps_version not in PS_VERSIONS:
        raise ConfigError(f"config.json 'ps_version' must be one of {PS_VERSIONS}, got {ps_version!r}")
    layers = vc.get("num_hidden_layers")
    select_layer = raw.get("select_layer", -1)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConfigError(f"vision_config 'num_hidden_layers' must be a positive int, got {layers!r}")
    if not isinstance(select_layer, int) or isinstance(select_layer, bool) or not -layers - 1 <= select_layer <= layers:
        raise ConfigError(f"config.json 'select_layer' must be an int in [-{layers + 1}, {layers}], got {select_layer!r}")
    norm_type = vc.get("norm_type", "rms_norm")
    if norm_type not in ("rms_norm", "layer_norm"):
        raise ConfigError(f"vision_config 'norm_type' must be 'rms_norm' or 'layer_norm', got {norm_type!r}")
    force = raw.get("force_image_size")
    if force is not None and (not isinstance(force, int) or isinstance(force, bool) or force < 1):
        raise ConfigError(f"config.json 'force_image_size' must be a positive int or null, got {force!r}")
    dynamic = raw.get("dynamic_image_size", False)
    for name, value in (("dynamic_image_size", dynamic), ("use_thumbnail", raw.get("use_thumbnail", False))):
        if not isinstance(value, bool):
            raise ConfigError(f"config.json {name!r} must be a bool, got {value!r}")

    vision = {key: vc[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size") if key in vc}
    vision.update(  # InternVisionConfig's defaults where a field is absent
        image_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 14),
        attention_bias=bool(vc.get("qkv_bias", False)),
        use_qk_norm=bool(vc.get("qk_normalization", True)),
        norm_type=norm_type,
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-6)),
        hidden_act=vc.get("hidden_act", "gelu"),
        use_mean_pooling=True,  # the custom tower has no final norm: HF's layernorm is then Identity
        use_absolute_position_embeddings=True,
    )
    return {
        "text_config": llm,
        "vision_config": vision,
        "downsample_ratio": raw.get("downsample_ratio", 0.5),
        "vision_feature_layer": select_layer,
        "template": raw.get("template"),
        "system_message": raw.get("system_message"),
        # without dynamic_image_size, InternVL's datasets and eval scripts resize each image to one
        # tile (`images = [image]`, then the input_size transform): max_num 1, no thumbnail
        "max_dynamic_patch": raw.get("max_dynamic_patch", 6) if dynamic else 1,
        "min_dynamic_patch": raw.get("min_dynamic_patch", 1) if dynamic else 1,
        "use_thumbnail": raw.get("use_thumbnail", False),
        "ps_version": ps_version,
        "force_image_size": force,
        **{k: raw[k] for k in ("flash_mode", "flash_relative_threshold", "flash_absolute_threshold") if k in raw},
    }
