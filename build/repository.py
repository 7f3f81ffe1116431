"""`make build`: a checkpoint → OUT/ with the vision ONNX and a complete Triton model repository.

    python -m build.repository --model <checkpoint> --out <dir> [--max-images 4 ...]

config.pbtxt files are filled from the templates in triton_repo/ with values from the checkpoint's
ModelConfig and the build settings below; nothing in a template is a model-specific number.
Re-running is idempotent: the ONNX export is skipped unless the checkpoint or the vision graph's
code changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from build.export_vision import export_stamp, export_vision_onnx
from engine.config import ModelConfig

TEMPLATES = Path(__file__).resolve().parents[1] / "triton_repo"
MODELS = ("preprocess", "vision_encoder", "llm", "postprocess", "internvl")


@dataclass(frozen=True)
class BuildSettings:
    max_images: int = 4  # images per request
    max_batch_size: int = 8  # requests per Triton batch (the batch dimension of every model)
    llm_max_batch_size: int = 8  # sequences decoding together (in-flight batching)
    max_num_tokens: int = 2048  # tokens per engine step (bounds how long a prefill stalls decodes)
    text_budget: int = 2048  # prompt tokens beyond the image tokens
    preprocess_instances: int = 2
    vision_queue_delay_us: int = 0  # requests arriving during a run still batch; waiting only adds TTFT

    def limits(self, config: ModelConfig) -> dict[str, int]:
        max_tiles = self.max_images * config.max_tiles_per_image
        max_input_len = min(max_tiles * config.vision.tokens_per_tile + self.text_budget, config.text.max_position_embeddings - 1)
        return {"max_tiles_per_request": max_tiles, "max_input_len": max_input_len}


def build(checkpoint: str | Path, out: str | Path, settings: BuildSettings = BuildSettings()) -> Path:
    config = ModelConfig.from_pretrained(checkpoint)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    onnx_file = out / "vision_encoder.onnx"
    stamp_file = out / "build.json"
    stamp = export_stamp(config.path)
    previous = json.loads(stamp_file.read_text(encoding="utf-8")) if stamp_file.is_file() else {}
    if onnx_file.is_file() and previous.get("stamp") == stamp:
        print(f"[1/2] vision ONNX up to date: {onnx_file}")
    else:
        print("[1/2] exporting the vision encoder to ONNX (dynamic tiles axis) ...", flush=True)
        started = time.perf_counter()
        export_vision_onnx(config.path, onnx_file)
        print(f"      {onnx_file} ({time.perf_counter() - started:.1f} s)")

    values = {
        **asdict(settings),
        **settings.limits(config),
        "checkpoint": str(config.path.resolve()),
        "onnx_file": str(onnx_file),
        "image_size": config.vision.image_size,
        "hidden_size": config.text.hidden_size,
        "tokens_per_tile": config.vision.tokens_per_tile,
    }
    repository = out / "model_repository"
    if repository.exists():
        shutil.rmtree(repository)
    for model in MODELS:
        source = TEMPLATES / model
        target = repository / model
        (target / "1").mkdir(parents=True)
        template = string.Template((source / "config.pbtxt.tmpl").read_text(encoding="utf-8"))
        (target / "config.pbtxt").write_text(template.substitute(values), encoding="utf-8")
        adapter = source / "1" / "model.py"
        if adapter.is_file():
            shutil.copy2(adapter, target / "1" / "model.py")
    stamp_file.write_text(json.dumps({"stamp": stamp, "values": values}, indent=2), encoding="utf-8")
    print(f"[2/2] model repository: {repository} ({', '.join(MODELS)})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--out", type=Path, required=True)
    for name, default in asdict(BuildSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = vars(parser.parse_args())
    model, out = args.pop("model"), args.pop("out")
    build(model, out, BuildSettings(**args))


if __name__ == "__main__":
    main()
