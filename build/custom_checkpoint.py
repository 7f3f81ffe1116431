"""Write an HF-native checkpoint in InternVL's custom ("GitHub") layout: the inverse of
engine/custom_format.py. Vision + mlp1 go to shard 1, the language model to shard 2, with
model.safetensors.index.json; q/k/v are concatenated into attn.qkv, llm_config / vision_config are
named as InternVLChatConfig and InternVisionConfig name them, and a Llama language model can be
written as InternLM2ForCausalLM ships it (grouped `attention.wqkv`, InternLM2Config fields).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.custom_format import custom_name, fuse_wqkv, internlm2_name, wqkv_layout
from engine.preprocess import IMAGENET_MEAN, IMAGENET_STD
from engine.weights import canonical_name, checkpoint_files

CAUSAL_LM = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
# SkyworkR1VChatModel: the architecture vLLM registers for Skywork/Skywork-R1V-38B (vllm/model_executor/models/registry.py)
CUSTOM_ARCHITECTURES = {"internvl_chat": "InternVLChatModel", "skywork_chat": "SkyworkR1VChatModel"}


def write_custom(hf_dir: Path, out: Path, ps_version: str, model_type: str, internlm2: bool = False) -> None:
    """An HF-native checkpoint rewritten in the custom layout: vision + mlp1 in shard 1, the language
    model in shard 2, model.safetensors.index.json; tokenizer files copied. `internlm2`: the (Llama)
    language model is written as InternLM2ForCausalLM."""
    hf = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    vision, language = {}, {}
    for file in checkpoint_files(hf_dir):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                (language if key.startswith("language_model.") else vision)[custom_name(key)] = f.get_tensor(key)
    for key in [k for k in vision if k.endswith(("attn.q_proj.weight", "attn.q_proj.bias"))]:
        stem, leaf = key.rsplit(".q_proj.", 1)
        vision[f"{stem}.qkv.{leaf}"] = torch.cat([vision.pop(f"{stem}.{p}_proj.{leaf}") for p in "qkv"])
    config = custom_config(hf, ps_version, model_type)
    if internlm2:
        config.update(llm_config=internlm2_llm_config(config["llm_config"]), template="internlm2-chat")
        language = _internlm2_weights(language, wqkv_layout(config["llm_config"]))
    shards = {"model-00001-of-00002.safetensors": vision, "model-00002-of-00002.safetensors": language}
    weight_map = {}
    for name, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    processor = preprocessor_config(config["force_image_size"])
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    for file in hf_dir.iterdir():
        if file.suffix != ".safetensors" and file.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(file, out / file.name)


def preprocessor_config(image_size: int) -> dict:
    """preprocessor_config.json as InternVL's custom-format checkpoints ship it: a CLIP image processor
    at the tile size with ImageNet's mean/std (the chat code's build_transform; llama.cpp's
    convert_hf_to_gguf.py --mmproj reads image_mean / image_std from it)."""
    return {
        "crop_size": image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "resample": 3,  # bicubic
        "size": image_size,
    }


def _internlm2_weights(language: dict, layout: tuple[int, int, int]) -> dict:
    """Llama decoder tensors under InternLM2ForCausalLM's names, q/k/v fused into the grouped wqkv."""
    out = {}
    for key, tensor in language.items():
        name = canonical_name(key)  # language_model.<decoder name> | lm_head.*
        name = "language_model." + name if name.startswith("lm_head.") else "language_model.model." + name[len("language_model.") :]
        out[internlm2_name(name)] = tensor
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        stem, leaf = key.split(".self_attn.q_proj.")
        q, k, v = (out.pop(f"{stem}.self_attn.{p}_proj.{leaf}") for p in "qkv")
        out[f"{stem}.attention.wqkv.{leaf}"] = fuse_wqkv(q, k, v, layout)
    return out


def check_internlm2_shape(text: dict, what: str = "this preset") -> None:
    """InternLM2 has no head_dim field: it is hidden_size // num_attention_heads."""
    heads = text["num_attention_heads"]
    if text.get("head_dim", text["hidden_size"] // heads) * heads != text["hidden_size"]:
        raise ValueError(f"InternLM2 needs head_dim == hidden_size // num_attention_heads; {what} has another head_dim")


def internlm2_llm_config(llama: dict) -> dict:
    """InternLM2Config.to_dict() (configuration_internlm2.py field names) for a Llama llm_config."""
    heads = llama["num_attention_heads"]
    check_internlm2_shape(llama)
    return dict(
        architectures=["InternLM2ForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        model_type="internlm2",
        vocab_size=llama["vocab_size"],
        hidden_size=llama["hidden_size"],
        intermediate_size=llama["intermediate_size"],
        num_hidden_layers=llama["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=llama.get("num_key_value_heads") or heads,
        hidden_act=llama.get("hidden_act", "silu"),
        max_position_embeddings=llama["max_position_embeddings"],
        initializer_range=0.02,
        rms_norm_eps=llama.get("rms_norm_eps", 1e-6),
        use_cache=True,
        pad_token_id=llama.get("pad_token_id") or 0,
        bos_token_id=llama.get("bos_token_id") or 1,
        eos_token_id=llama.get("eos_token_id") or 2,
        tie_word_embeddings=llama.get("tie_word_embeddings", False),
        bias=False,
        rope_theta=llama["rope_theta"],
        rope_scaling=None,
        attn_implementation="eager",
        rope_pos_id_version="default",
        torch_dtype=llama.get("torch_dtype", llama.get("dtype", "float32")),
    )


def custom_config(hf: dict, ps_version: str, model_type: str) -> dict:
    """config.json of InternVLChatConfig.to_dict() for the HF-native config `hf`."""
    vc, tc = hf["vision_config"], dict(hf["text_config"])
    rope = dict(tc.pop("rope_parameters", None) or {})
    theta = rope.pop("rope_theta", 10000.0)
    tc.update(  # as transformers 4.x configs (the hub's custom checkpoints) store them
        architectures=[CAUSAL_LM[tc["model_type"]]], rope_theta=theta, rope_scaling=rope if rope.get("rope_type", "default") != "default" else None
    )
    size = vc["image_size"][0] if isinstance(vc["image_size"], list) else vc["image_size"]
    vision_config = dict(
        architectures=["InternVisionModel"],
        model_type="intern_vit_6b",
        hidden_size=vc["hidden_size"],
        num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"],
        intermediate_size=vc["intermediate_size"],
        image_size=size,
        patch_size=vc["patch_size"][0] if isinstance(vc["patch_size"], list) else vc["patch_size"],
        num_channels=3,
        qkv_bias=vc["attention_bias"],
        qk_normalization=vc["use_qk_norm"],
        norm_type=vc["norm_type"],
        layer_norm_eps=vc["layer_norm_eps"],
        hidden_act=vc["hidden_act"],
        use_flash_attn=False,
        drop_path_rate=0.0,
        dropout=0.0,
        attention_dropout=0.0,
        initializer_factor=0.1,
    )
    return dict(
        architectures=[CUSTOM_ARCHITECTURES[model_type]],
        model_type=model_type,
        llm_config=tc,
        vision_config=vision_config,
        template=hf.get("template"),
        ps_version=ps_version,
        select_layer=hf.get("vision_feature_layer", -1),
        force_image_size=size,
        downsample_ratio=hf["downsample_ratio"],
        dynamic_image_size=True,
        use_thumbnail=hf.get("use_thumbnail", True),
        min_dynamic_patch=hf.get("min_dynamic_patch", 1),
        max_dynamic_patch=hf.get("max_dynamic_patch", 12),
        pad2square=False,
        use_backbone_lora=0,
        use_llm_lora=0,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        torch_dtype=hf.get("dtype", hf.get("torch_dtype", "float32")),
    )


# The Flash thresholds written to tiny checkpoints: the released models' values were not found in any
# public source (their config.json is on the hub only), so these are chosen to route a mix of tiles.
FLASH_THRESHOLDS = dict(flash_relative_threshold=0.3, flash_absolute_threshold=0.5)


@torch.no_grad()
def add_flash(out: Path, projector_scale: float) -> None:
    """Makes the custom checkpoint in `out` an InternVL3.5-Flash one: seeded router modules
    (pooling_before_gating, gating) and the 64-token projector (mlp2) in a third shard, and
    flash_mode with thresholds in config.json. The gate's last layer is scaled so tiles of different
    images get clearly different scores and its bias centres them (a constant gate would route every
tile alike)."""
    from engine.vision_flash import CrossAttentionPooling, Gating, compressed_projector

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    c, h = config["vision_config"]["hidden_size"], config["llm_config"]["hidden_size"]
    modules = {"pooling_before_gating.": CrossAttentionPooling(c), "gating.": Gating(c), "mlp2.": compressed_projector(c, h)}
    modules["pooling_before_gating."].query_token.normal_(0.0, 1.0)
    gate = modules["gating."].gate[1]
    gate.weight.mul_(6.0)
    gate.bias.copy_(torch.tensor([1.25, -1.25]))  # centres the tiny tower's scores near 0.5
    modules["mlp2."][7].weight.mul_(projector_scale)
    tensors = {prefix + k: v.contiguous() for prefix, m in modules.items() for k, v in m.state_dict().items()}
    shard = "model-flash.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text(encoding="utf-8"))
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_file.write_text(json.dumps(index, indent=2), encoding="utf-8")
    config.update(flash_mode=True, **FLASH_THRESHOLDS)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
