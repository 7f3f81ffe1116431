"""Convert a custom-format (GitHub) InternVL checkpoint to the HF-native layout transformers loads.

    python -m build.convert --model <custom checkpoint> --out <dir>

The weights go through the same mapping the engine reads custom checkpoints with (engine/weights.py,
engine/custom_format.py: transformers' converter names, `attn.qkv` split, InternLM2 → Llama names with
the grouped `wqkv` split) and are streamed, in their stored dtype, into shards under
InternVLForConditionalGeneration's own names (build/shards.py); config.json
is InternVLConfig's, keeping `template`, `system_message` and the tiling fields for this engine.
Refused, naming the field, where transformers' InternVL cannot express the checkpoint: pixel shuffle
v1, a `force_image_size` other than the tower's, q/k norms with an eps other than 1e-6. The engine
serves such checkpoints directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from build.shards import SHARD_BYTES, ShardWriter
from engine.config import ModelConfig, read_config
from engine.weights import checkpoint_files, iter_weights

# canonical prefix (engine/weights.py) -> InternVLForConditionalGeneration's parameter prefix
_HF_PREFIXES = {
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "language_model.": "model.language_model.",
    "lm_head.": "lm_head.",
}


class ConvertError(ValueError):
    pass


def hf_config(model: Path) -> dict:
    raw, custom = read_config(model)
    if not custom:
        raise ConvertError(f"{model} is already an HF-native checkpoint (config.json has 'text_config')")
    vision, text = dict(raw["vision_config"]), dict(raw["text_config"])
    if raw["ps_version"] != "v2":
        raise ConvertError("config.json 'ps_version' is 'v1': transformers' InternVL shuffles pixels as v2 only")
    if raw["force_image_size"] not in (None, vision["image_size"]):
        raise ConvertError(
            f"config.json 'force_image_size' {raw['force_image_size']} differs from the tower's image_size {vision['image_size']}"
        )
    if vision["use_qk_norm"] and vision["layer_norm_eps"] != 1e-6:
        raise ConvertError(f"vision_config 'layer_norm_eps' {vision['layer_norm_eps']}: transformers' q/k norms use 1e-6")
    text.pop("llm_family", None)  # InternLM2 is written as the Llama it computes
    config = ModelConfig.from_pretrained(model)
    return {
        **{k: v for k, v in raw.items() if k not in ("ps_version", "force_image_size")},
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": {**vision, "model_type": "internvl_vision"},
        "text_config": text,
        "image_token_id": config.image_token_id,
        "image_seq_length": config.vision.tokens_per_tile,
    }


def convert(model: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    model, out = Path(model), Path(out)
    config = hf_config(model)
    shards = ShardWriter(out, shard_bytes)
    for name, tensor in iter_weights(model):  # stored dtype, file by file
        canonical = next(p for p in _HF_PREFIXES if name.startswith(p))
        shards.add(_HF_PREFIXES[canonical] + name[len(canonical) :], tensor)
    shards.close()
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weight_files = {f.name for f in checkpoint_files(model)}
    for file in model.iterdir():
        if file.is_file() and file.name not in weight_files | {"config.json", "model.safetensors.index.json"} and file.suffix != ".py":
            shutil.copy(file, out / file.name)
    return out


def main() -> None:
    from build.settings import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m build.convert", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="custom-format checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for the HF-native checkpoint")
    args = parser.parse_args()
    try:
        print(convert(args.model, args.out))
    except ConvertError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
