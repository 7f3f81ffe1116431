"""InternVL's custom ("GitHub") checkpoint format, read as the HF-native one without conversion.

`InternVLChatModel` (`model_type` internvl_chat) and Skywork's `SkyworkChatModel` (skywork_chat, the
same layout) store `config.json` with `llm_config`, `vision_config` (InternViT) and the chat fields,
and weights `vision_model.*`, `mlp1.*`, `language_model.*`. Followed:
- OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py
  (InternVLChatConfig: the field names and class defaults), configuration_intern_vit.py
  (InternVisionConfig defaults), modeling_internvl_chat.py (extract_feature: select_layer over
  hidden_states, drop CLS, pixel_shuffle by ps_version, mlp1), modeling_intern_vit.py (no final
  norm after the encoder; q_norm/k_norm are RMSNorm with layer_norm_eps whatever norm_type is);
- transformers' models/internvl/convert_internvl_weights_to_hf.py (weight names, the attn.qkv split
  into thirds, qk_normalization → use_qk_norm, qkv_bias → attention_bias).
"""

from __future__ import annotations

import torch

from engine.config import ConfigError

MODEL_TYPES = ("internvl_chat", "skywork_chat")
PS_VERSIONS = ("v1", "v2")
# Language models this step reads from llm_config; InternLM2 (wqkv, its own names) comes later.
NOT_YET = {"internlm2": "InternLM2"}

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


def custom_name(key: str) -> str:
    """The inverse of hf_name (build/checkpoint.py writes custom checkpoints with it)."""
    return _rename(key, forward=False)


def _rename(key: str, forward: bool) -> str:
    src, dst = (0, 1) if forward else (1, 0)
    if key.startswith(_VISION_NAMES[0][src]):
        for pair in _VISION_NAMES:
            key = key.replace(pair[src], pair[dst], 1)
        return key
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
    model_type = llm.get("model_type")
    if model_type in NOT_YET:
        raise ConfigError(
            f"llm_config.model_type {model_type!r} ({NOT_YET[model_type]}) is not supported yet in the "
            "custom format; convert the checkpoint to the HF-native layout or use a Qwen2/Qwen3/Llama one"
        )
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
    }
