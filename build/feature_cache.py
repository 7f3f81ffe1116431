"""The frozen tower's features of a pool of scenes, encoded once (shapes demo model, stage 2).

Stage 2 trains only the projector and the LLM, so what the tower makes of a scene never changes: each
scene is tiled at every tile budget of the curriculum by the real preprocessing and encoded once; its
pixel-shuffled tower features (before the projector) are stored fp16 on disk, with the scene's items for
the questions. A stage-2 step then costs no vision compute.

Layout of a pool directory, per budget B: `B/features.f16` ([tiles, 256, C] fp16, raw), `B/tiles.npy`
(tiles per scene), and `scenes.json` (the items of every scene, the pool's seed and budgets, C).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import InternVLForConditionalGeneration

from build.scenes import Item, Scene, draw_scene
from engine.preprocess import load_images

ENCODE_TILES = 32  # tiles per tower forward while encoding


def shuffled_features(model: InternVLForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's patch features after pixel shuffle, what the projector reads."""
    # pixel_values: [T, 3, S, S] -> [T, Q, C] (Q = 256 at 448 px / patch 14, C = 4 × the tower's width)
    inner = model.model
    patches = inner.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]  # without the CLS token
    side = int(patches.shape[1] ** 0.5)
    grid = inner.pixel_shuffle(patches.reshape(len(patches), side, side, -1), scale_factor=model.config.downsample_ratio)
    return grid.reshape(len(patches), -1, grid.shape[-1])


def tower_fingerprint(model: InternVLForConditionalGeneration) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_pool(model: InternVLForConditionalGeneration, out: Path, seed: int, scenes: int, budgets: tuple[int, ...]) -> Path:
    """Draws `scenes` scenes (seeded), encodes each at every budget into out; kept if out holds this
    pool of this tower."""
    record = {"seed": seed, "scenes": scenes, "budgets": list(budgets), "tower": tower_fingerprint(model)}
    meta = out / "scenes.json"
    if meta.is_file() and {k: v for k, v in json.loads(meta.read_text()).items() if k not in ("channels", "items")} == record:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 3])
    items, files, counts, channels = [], {}, {b: [] for b in budgets}, []
    for budget in budgets:
        (out / str(budget)).mkdir(exist_ok=True)
        files[budget] = open(out / str(budget) / "features.f16", "wb")
    pending = {b: [] for b in budgets}  # tiles waiting for a full forward

    def flush(budget: int) -> None:
        if pending[budget]:
            with torch.no_grad():
                features = shuffled_features(model, torch.from_numpy(np.concatenate(pending[budget])))
            files[budget].write(features.to(torch.float16).numpy().tobytes())
            channels[:] = [features.shape[-1]]
            pending[budget].clear()

    try:
        for _ in tqdm(range(scenes), desc="encoding the scene pool", unit="scene"):
            scene = draw_scene(rng)
            items.append([asdict(i) for i in scene.items])
            for budget in budgets:
                pixel_values, (count,) = load_images([scene.image], max_num=budget)
                pending[budget].append(pixel_values)
                counts[budget].append(count)
                if sum(len(p) for p in pending[budget]) >= ENCODE_TILES:
                    flush(budget)
        for budget in budgets:
            flush(budget)
    finally:
        for f in files.values():
            f.close()
    for budget in budgets:
        np.save(out / str(budget) / "tiles.npy", np.array(counts[budget], np.int32))
    meta.write_text(json.dumps({**record, "channels": channels[0], "items": items}), encoding="utf-8")
    return out


class Pool:
    """An encoded pool, memory-mapped: scenes (items only, no pixels) and their features per budget."""

    def __init__(self, path: Path):
        meta = json.loads((path / "scenes.json").read_text(encoding="utf-8"))
        channels = meta["channels"]
        self.budgets = tuple(meta["budgets"])
        self.scenes = [Scene(None, tuple(Item(i["shape"], i["color"], tuple(i["box"]), i["rotation"]) for i in s)) for s in meta["items"]]
        self.tiles, self.starts, self.features = {}, {}, {}
        for budget in self.budgets:
            tiles = np.load(path / str(budget) / "tiles.npy")
            self.tiles[budget], self.starts[budget] = tiles, np.concatenate([[0], np.cumsum(tiles)])
            raw = np.memmap(path / str(budget) / "features.f16", dtype=np.float16, mode="r")
            self.features[budget] = raw.reshape(int(tiles.sum()), -1, channels)

    def __len__(self) -> int:
        return len(self.scenes)

    def scene_features(self, index: int, budget: int) -> np.ndarray:
        # -> [T, Q, C] fp16
        start, end = self.starts[budget][index], self.starts[budget][index + 1]
        return self.features[budget][start:end]
