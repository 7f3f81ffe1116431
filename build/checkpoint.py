"""Generate a complete HF-native InternVL checkpoint with seeded random weights and a trained tokenizer.

    python -m build.checkpoint --preset tiny --llm qwen3 --out artifacts/checkpoints/tiny-qwen3

Real InternVL shapes (448 tiles, patch 14, downsample 0.5 → Q = 256) even for `tiny`, so every code
path is the real one. Speed depends on shapes, not weight values: `internvl3_5-1b` (InternViT-300M
+ Qwen3-0.6B shapes) is valid for benchmarks, and the real presets of the large seeds
(`skywork-r1v-38b`, `internvl3_5-241b-a28b`, `internvl3_5-gpt-oss-20b`; build/presets.py) give real
widths for sizing, with `--layers N` to cut their depth.

Freshly initialised models ignore their input (near-uniform attention, tiny image features) and
repeat one token, which would let a broken feature hand-off still "match" a reference. So the
weights are scaled to make the output depend on the image and the prompt: sharper attention,
larger projector output, and special or padding tokens that can never win the argmax. A Qwen3-MoE
language model (`--llm qwen3_moe`, tiny preset only) also gets a sharper router, so tokens spread
over distinct experts, and larger experts, so the route changes the reply.

`--vision internvit-6b` gives the tower InternViT-6B's structure (RMSNorm, q/k RMSNorm over the whole
embed dim, no q/k/v bias, layer scale) at the preset's sizes; such towers, and custom-format ones,
get random layer scales and norm weights so a swapped name cannot pass a test. `--format custom
[--ps-version v1|v2] [--model-type internvl_chat|skywork_chat]` writes InternVL's custom ("GitHub")
layout instead: the HF-native checkpoint is made first, then renamed by the inverse of
engine/custom_format.py (q/k/v concatenated into attn.qkv, mlp1.*, llm_config / vision_config
fields as InternVLChatConfig and InternVisionConfig name them), in two safetensors shards + index.
`--llm gpt_oss` (tiny preset) makes a GPT-OSS language model: routed experts in every layer with
biases and the clamped SwiGLU, attention sinks, layers alternating sliding-window / full attention,
YaRN rotary, the harmony special tokens and the `internvl3_5_gpt_oss` template; its sinks, expert
biases and router get random values (transformers initialises biases to zero), so a dropped one
cannot pass a test.
`--llm internlm2` (custom format only: transformers has no InternLM2 model) writes the language model
as InternLM2ForCausalLM ships it: a Llama model is made (the same math, num_key_value_heads <
num_attention_heads so the grouped wqkv matters), then renamed to InternLM2's names with q/k/v fused
into the grouped `attention.wqkv` (engine/custom_format.py fuse_wqkv), an InternLM2Config llm_config
and the `internlm2-chat` template.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

from build.custom_checkpoint import CUSTOM_ARCHITECTURES, add_flash, check_internlm2_shape, write_custom
from build.presets import LLM_VARIANTS, PRESETS, VISION_VARIANTS, Preset


CORPUS = Path(__file__).with_name("corpus.txt")
# (token, special): special tokens are dropped when decoding; <think> tags stay visible (Qwen3 style).
ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<img>", True),
    ("</img>", True),
    ("<IMG_CONTEXT>", True),
    ("<think>", False),
    ("</think>", False),
)
# gpt_oss checkpoints add the harmony tokens of their template (internvl3_5_gpt_oss), all special
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATE_OF = {"gpt_oss": "internvl3_5_gpt_oss"}  # others: internvl2_5 (InternLM2: write_custom)


def train_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the shipped corpus, with the InternVL special tokens appended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens([t for t, special in ADDED_TOKENS if not special])
    fast.add_special_tokens({"additional_special_tokens": [t for t, special in ADDED_TOKENS if special] + list(extra_special)})
    return fast


def build_config(
    preset: Preset, llm: str, tokenizer: PreTrainedTokenizerFast, vision_variant: str = "internvit-300m", layers: int | None = None
) -> InternVLConfig:
    """layers: at most this many layers in the language model and in the vision tower."""
    vocab_size = preset.vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {len(tokenizer)}")
    check_preset(preset, llm, vision_variant)
    text = dict(preset.text, **LLM_VARIANTS[llm], vocab_size=vocab_size, tie_word_embeddings=preset.tie_word_embeddings)
    text.update(preset.family_text.get(llm, {}))
    depth = min(text["num_hidden_layers"], layers or text["num_hidden_layers"])
    text["num_hidden_layers"] = depth
    if llm == "qwen3_moe":
        text.update(preset.moe, mlp_only_layers=[i for i in preset.moe.get("mlp_only_layers", []) if i < depth])
    if llm == "gpt_oss":
        moe = preset.moe
        text.update(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"], intermediate_size=moe["moe_intermediate_size"])
    rope = text.pop("rope_scaling", {"rope_type": "default"})
    text["rope_parameters"] = dict(rope, rope_theta=text.pop("rope_theta"))
    vision = dict(
        preset.vision,
        num_hidden_layers=min(preset.vision["num_hidden_layers"], layers or preset.vision["num_hidden_layers"]),
        image_size=448,
        patch_size=14,
        layer_norm_eps=1e-6,
        **VISION_VARIANTS[vision_variant],
    )
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=preset.tie_word_embeddings,
        template=TEMPLATE_OF.get(llm, "internvl2_5"),
        max_dynamic_patch=12,
        min_dynamic_patch=1,
        use_thumbnail=True,
    )


def check_preset(preset: Preset, llm: str, vision_variant: str) -> None:
    """A real preset is its model's family and tower; MoE families need an expert shape."""
    name = next((k for k, v in PRESETS.items() if v is preset), "this preset")
    if preset.llm is not None and llm != preset.llm:
        raise ValueError(f"--preset {name} is a {preset.llm} language model; --llm {llm} does not fit it")
    if preset.vision_variant is not None and vision_variant != preset.vision_variant:
        raise ValueError(f"--preset {name} has an {preset.vision_variant} tower; --vision {vision_variant} does not fit it")
    if llm in ("qwen3_moe", "gpt_oss") and preset.moe is None:
        raise ValueError(f"--preset {name} has no expert shape; --llm {llm} needs a preset with one (tiny or its real preset)")
    if llm == "internlm2":
        check_internlm2_shape(preset.text, f"--preset {name}")


@torch.no_grad()
def _make_input_sensitive(model: InternVLForConditionalGeneration, tokenizer, knobs: dict) -> None:
    lm = model.model.language_model
    for layer in lm.layers:
        layer.self_attn.q_proj.weight.mul_(knobs.get("qk", 1.0))
        layer.self_attn.k_proj.weight.mul_(knobs.get("qk", 1.0))
        if hasattr(layer.mlp, "router"):  # GPT-OSS: distinct routes, experts and biases that matter, sinks that take a share
            layer.mlp.router.weight.mul_(knobs.get("router", 1.0))
            layer.mlp.router.bias.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.mul_(knobs.get("experts", 1.0))
            layer.mlp.experts.gate_up_proj_bias.normal_(0.0, 0.5)
            layer.mlp.experts.down_proj_bias.normal_(0.0, 0.05)
            layer.self_attn.sinks.uniform_(1.0, 6.0)
        elif hasattr(layer.mlp, "experts"):  # Qwen3-MoE: distinct routes per token, experts that matter
            layer.mlp.gate.weight.mul_(knobs.get("router", 1.0))
            layer.mlp.experts.gate_up_proj.mul_(knobs.get("experts", 1.0))
    model.model.multi_modal_projector.linear_2.weight.mul_(knobs.get("projector", 1.0))
    lm.embed_tokens.weight.mul_(knobs.get("embed", 1.0))
    model.lm_head.weight.mul_(knobs.get("lm_head", 1.0))  # wide logit spread: clear top-1/top-2 margins
    # Zero logits for special and padding ids: ordinary tokens always outscore them.
    never_win = tokenizer.convert_tokens_to_ids(tokenizer.all_special_tokens)
    model.lm_head.weight[never_win] = 0.0
    model.lm_head.weight[len(tokenizer) :] = 0.0


@torch.no_grad()
def _vary_vision(model: InternVLForConditionalGeneration) -> None:
    """Distinct layer scales and norm weights per layer (initialised constant, so a swapped
    ls1/ls2, norm1/norm2 or q_norm/k_norm name would otherwise go unnoticed)."""
    for layer in model.model.vision_tower.encoder.layer:
        for scale in (layer.lambda_1, layer.lambda_2):
            scale.uniform_(0.05, 0.4)
        for norm in (layer.layernorm_before, layer.layernorm_after, layer.attention.q_norm, layer.attention.k_norm):
            if hasattr(norm, "weight"):
                norm.weight.normal_(1.0, 0.15)


def generate(
    preset_name: str,
    llm: str,
    out: Path,
    seed: int = 0,
    vision: str = "internvit-300m",
    fmt: str = "hf",
    ps_version: str = "v2",
    model_type: str = "internvl_chat",
    flash: bool = False,
    layers: int | None = None,
) -> Path:
    """Write the checkpoint to `out` (skipped when `out` already holds this exact one)."""
    if llm == "internlm2" and fmt != "custom":
        raise ValueError("--llm internlm2 needs --format custom: transformers has no HF-native InternLM2 layout")
    stamp = {"preset": preset_name, "llm": llm, "seed": seed, "corpus_bytes": CORPUS.stat().st_size}
    if vision != "internvit-300m":
        stamp["vision"] = vision
    if fmt != "hf":
        stamp.update(format=fmt, ps_version=ps_version, model_type=model_type)
    if layers is not None:
        stamp["layers"] = layers
    if flash:
        if fmt != "custom":
            raise ValueError("--flash needs --format custom: InternVL3.5-Flash ships in the custom layout only")
        stamp["flash"] = True
    stamp_file = out / "generated_by.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text(encoding="utf-8")) == stamp:
        return out
    preset = PRESETS[preset_name]
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(preset.tokenizer_vocab, HARMONY_TOKENS if llm == "gpt_oss" else ())
    config = build_config(preset, llm, tokenizer, vision, layers)
    model = InternVLForConditionalGeneration(config).eval()
    _make_input_sensitive(model, tokenizer, preset.sharpen)
    if vision != "internvit-300m" or fmt != "hf":
        _vary_vision(model)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "custom":
        with tempfile.TemporaryDirectory() as hf_dir:
            model.to(preset.dtype).save_pretrained(hf_dir)
            tokenizer.save_pretrained(hf_dir)
            write_custom(Path(hf_dir), out, ps_version, model_type, internlm2=llm == "internlm2")
        if flash:
            add_flash(out, preset.sharpen.get("projector", 1.0))
    else:
        model.to(preset.dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)
    stamp_file.write_text(json.dumps(stamp), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m build.checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--llm", choices=sorted(LLM_VARIANTS), help="language model family (default: the real preset's, else qwen3)")
    parser.add_argument("--vision", choices=sorted(VISION_VARIANTS), help="tower structure at the preset's sizes (default: the real preset's, else internvit-300m)")
    parser.add_argument("--layers", type=int, help="at most N layers in the language model and in the vision tower (real presets: real widths, less depth)")
    parser.add_argument("--format", choices=("hf", "custom"), default="hf", help="HF-native, or InternVL's custom (GitHub) layout (default hf)")
    parser.add_argument("--ps-version", choices=("v1", "v2"), help="custom format: pixel shuffle version (default v2)")
    parser.add_argument("--model-type", choices=sorted(CUSTOM_ARCHITECTURES), help="custom format (default internvl_chat)")
    parser.add_argument("--flash", action="store_true", help="custom format: an InternVL3.5-Flash checkpoint (router + mlp2, flash_mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    args.llm = args.llm or preset.llm or "qwen3"
    args.vision = args.vision or preset.vision_variant or "internvit-300m"
    try:
        check_preset(preset, args.llm, args.vision)
    except ValueError as error:
        parser.error(str(error))
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be ≥ 1")
    if args.llm == "internlm2" and args.format != "custom":
        parser.error("--llm internlm2 needs --format custom (transformers has no HF-native InternLM2 layout)")
    if args.format == "hf" and (args.ps_version or args.model_type or args.flash):
        parser.error("--ps-version, --model-type and --flash need --format custom")
    ps_version, model_type = args.ps_version or "v2", args.model_type or "internvl_chat"
    print(generate(args.preset, args.llm, args.out, args.seed, args.vision, args.format, ps_version, model_type, args.flash, args.layers))


if __name__ == "__main__":
    main()
