"""The single source of every shape and limit: a validated config read once from the checkpoint.

Reads HF-native InternVL checkpoints (`InternVLForConditionalGeneration`: config.json with
`vision_config`, `text_config`, `image_token_id`, `downsample_ratio`, `vision_feature_layer`) and
custom ("GitHub") ones (`internvl_chat` / `skywork_chat`: `llm_config`, `vision_config`,
`select_layer`, `ps_version`, …; engine/custom_format.py reads them as the HF-native fields), plus
the tokenizer's special tokens. Every other module copies the fields it needs from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.flash import FlashConfig, flash_config
from engine.templates import TEMPLATES, ChatTemplate, Template
from engine.text_config import ConfigError, TextConfig, field, text_config

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclass(frozen=True, slots=True)
class VisionConfig:
    image_size: int  # S: tiles are S×S
    patch_size: int
    hidden_size: int  # C
    num_layers: int  # layers actually run (vision_feature_layer applied)
    final_layernorm: bool  # last_hidden_state carries the tower's final LayerNorm
    downsample_ratio: float
    tokens_per_tile: int  # Q = (S / patch)² · ratio²
    ps_version: str = "v2"  # pixel shuffle token order: v2 row-major (HF-native), v1 transposed (custom)

    @property
    def projector_in_size(self) -> int:  # C · (1/ratio)²
        return self.hidden_size * int(round(1 / self.downsample_ratio)) ** 2


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: Path
    vision: VisionConfig
    text: TextConfig
    template: Template | ChatTemplate  # the checkpoint's named template, else the tokenizer's
    system_message: str | None
    image_token_id: int  # <IMG_CONTEXT>
    img_start_id: int
    img_end_id: int
    stop_token_id: int
    max_num: int  # grid tiles per image (max_dynamic_patch); the thumbnail adds one
    min_num: int
    use_thumbnail: bool
    flash: FlashConfig | None = None  # InternVL3.5-Flash: tiles routed to 64 or 256 tokens

    @property
    def skip_special_tokens(self) -> bool:
        """Whether replies are decoded without special tokens (the named template's chat() decode)."""
        return getattr(self.template, "skip_special_tokens", True)

    @property
    def max_tiles_per_image(self) -> int:
        return self.max_num + (self.use_thumbnail and self.max_num > 1)

    def tile_budget(self, max_tiles: int | None, max_total_tiles: int | None = None, num_images: int = 1) -> int:
        """A request's tiles per image (the cards' max_num; None: the checkpoint's max_dynamic_patch),
        checked as the server checks it. max_total_tiles shares a budget among the request's images as
        InternVL's evaluations do (VLMEvalKit vlmeval/vlm/internvl/internvl_chat.py, generate_v2:
        max_num = max(1, min(max_num, total_max_num // image_num)), total_max_num 64); thumbnails
        are not counted in it there either."""
        budget = self.max_num if max_tiles is None else _positive("max_tiles", max_tiles, self.max_num)
        if max_total_tiles is not None and num_images:
            budget = max(1, min(budget, _positive("max_total_tiles", max_total_tiles) // num_images))
        return budget

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw, custom = read_config(path)
        vocab = _tokenizer_vocab(path)
        text_where = "llm_config" if custom else "text_config"  # errors name the field of the file's format
        text = text_config(field(raw, "text_config", dict), text_where)
        vision = _vision_config(raw)

        template_name = raw.get("template")
        if template_name is None:
            template = _chat_template(path, vocab)
        elif template_name in TEMPLATES:
            template = TEMPLATES[template_name]
        else:
            raise ConfigError(
                f"config.json template {template_name!r} is unknown; known: {sorted(TEMPLATES)}"
            )
        system_message = raw.get("system_message")
        if system_message is None and isinstance(template, Template):
            system_message = template.system_message

        def token_id(token: str) -> int:
            if token not in vocab:
                raise ConfigError(f"tokenizer in {path} has no {token!r} token")
            return vocab[token]

        image_token_id = int(raw.get("image_token_id", token_id(IMG_CONTEXT)))
        if image_token_id != token_id(IMG_CONTEXT):
            raise ConfigError(
                f"config.json image_token_id {image_token_id} is not the tokenizer's {IMG_CONTEXT} "
                f"id {token_id(IMG_CONTEXT)}"
            )
        max_num = int(raw.get("max_dynamic_patch", 12))
        min_num = int(raw.get("min_dynamic_patch", 1))
        if not 1 <= min_num <= max_num:
            raise ConfigError(f"need 1 ≤ min_dynamic_patch ≤ max_dynamic_patch, got {min_num}, {max_num}")
        return cls(
            path=path,
            vision=vision,
            text=text,
            template=template,
            system_message=system_message,
            image_token_id=image_token_id,
            img_start_id=token_id(IMG_START),
            img_end_id=token_id(IMG_END),
            stop_token_id=token_id(template.stop_token),
            max_num=max_num,
            min_num=min_num,
            use_thumbnail=bool(raw.get("use_thumbnail", True)),
            flash=flash_config(raw, vision.tokens_per_tile),
        )


def read_config(path: Path) -> tuple[dict, bool]:
    """-> (config.json with HF-native field names, whether the checkpoint is in the custom format)."""
    raw = _read_json(Path(path) / "config.json")
    from engine.custom_format import hf_view, is_custom  # it imports ConfigError from here

    if is_custom(raw):
        return hf_view(raw), True
    # transformers' InternVL has neither field: pixel shuffle v2, tiles of vision_config.image_size
    return {**raw, "ps_version": "v2", "force_image_size": None}, False


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise ConfigError(f"{file} not found: expected an InternVL checkpoint directory (HF-native or custom format)")
    return json.loads(file.read_text(encoding="utf-8"))


def _pair(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config {name!r} must be square, got {value!r}")
        value = value[0]
    return int(value)


def _vision_config(raw: dict) -> VisionConfig:
    vc = field(raw, "vision_config", dict)
    where = "vision_config"
    image_size = raw.get("force_image_size") or _pair(vc.get("image_size", 448), "image_size")
    patch_size = _pair(vc.get("patch_size", 14), "patch_size")
    ratio = float(raw.get("downsample_ratio", 0.5))
    if image_size % patch_size:
        raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    side = image_size // patch_size
    scale = round(1 / ratio)
    if abs(scale * ratio - 1) > 1e-9 or side % scale:
        raise ConfigError(f"downsample_ratio {ratio} does not divide the {side}×{side} patch grid")
    num_layers = field(vc, "num_hidden_layers", int, where)
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int) or not -num_layers - 1 <= layer <= num_layers:
        raise ConfigError(f"vision_feature_layer must be one int in [-{num_layers + 1}, {num_layers}], got {layer!r}")
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError("only vision_feature_select_strategy 'default' (drop CLS) is supported")
    return VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=field(vc, "hidden_size", int, where),
        num_layers=layer % (num_layers + 1),  # hidden_states[k] = output of the first k layers
        final_layernorm=layer == -1 and not vc.get("use_mean_pooling", True),
        downsample_ratio=ratio,
        tokens_per_tile=(side // scale) ** 2,
        ps_version=raw.get("ps_version", "v2"),
    )


def _tokenizer_vocab(path: Path) -> dict[str, int]:
    from engine.tokenizer import load_tokenizer  # it imports ConfigError from engine.text_config

    return load_tokenizer(path).get_vocab(with_added_tokens=True)


def _chat_template(path: Path, vocab: dict[str, int]) -> ChatTemplate:
    file = path / "tokenizer_config.json"
    tc = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    special = {
        key: value.get("content") if isinstance(value, dict) else value
        for key, value in tc.items()
        if key.endswith("_token") and isinstance(value, (str, dict))
    }
    jinja_file = path / "chat_template.jinja"  # where transformers ≥ 5 saves it
    source = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else tc.get("chat_template")
    if not isinstance(source, str) or special.get("eos_token") not in vocab:
        raise ConfigError(
            "config.json names no conversation template and tokenizer_config.json has no "
            "chat_template with an eos_token to stop on"
        )
    return ChatTemplate(source=source, stop_token=special["eos_token"], special_tokens=special)


def _positive(name: str, value, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or (upper is not None and value > upper):
        raise ValueError(f"{name} must be in [1, {upper}], got {value!r}" if upper else f"{name} must be a positive integer, got {value!r}")
    return int(value)
