"""InternVL3.5-Flash (ViR, the visual resolution router): per-request routing of tiles to 64 or 256 tokens.

Follows the Flash models' remote code `modeling_internvl_chat.py` (`generate_flash`,
`compress_visual_tokens_in_sentence`; lmdeploy's `pytorch/models/internvl.py` ports the same): the
prompt is built with Q (256) context tokens per tile as usual; a gate scores every tile (column 0 of
its softmax = "compress"); the threshold is the `flash_relative_threshold` quantile (linear
interpolation, float32) of those scores over all tiles of the request, thumbnails included; a tile
goes to the q-token path (q = 64) when its score is > that quantile and ≥ `flash_absolute_threshold`.
Then, for each compressed tile, the prompt positions q..Q-1 of its block are removed and the first q
take its q embeddings; the shorter prompt runs with contiguous positions. Routing is computed per
request (the reference runs one request per generate call): never across a batch of requests.

The table keeps its static layout [T·Q, H]: a compressed tile's rows 0..q-1 hold its q embeddings and
rows q..Q-1 are never read, because `drop_compressed` removes the prompt ids that would read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.text_config import ConfigError


@dataclass(frozen=True, slots=True)
class FlashConfig:
    relative_threshold: float  # quantile of the request's gate scores
    absolute_threshold: float  # minimum gate score to compress
    compressed_tokens_per_tile: int  # q: (side / (2·scale))², 64 for 448/14/0.5


def flash_config(raw: dict, tokens_per_tile: int) -> FlashConfig | None:
    """From config.json's flash_mode / flash_relative_threshold / flash_absolute_threshold (the
    remote code reads the thresholds only when flash_mode is true, and has no defaults for them)."""
    mode = raw.get("flash_mode", False)
    if not isinstance(mode, bool):
        raise ConfigError(f"config.json 'flash_mode' must be a bool, got {mode!r}")
    if not mode:
        return None
    values = {}
    for name in ("flash_relative_threshold", "flash_absolute_threshold"):
        value = raw.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"config.json {name!r} must be a number in [0, 1] when flash_mode is true, got {value!r}")
        values[name] = float(value)
    if raw.get("vision_feature_layer", -1) != -1:
        raise ConfigError("config.json 'select_layer' must be -1 with flash_mode (the router reads the tower's last layer)")
    side = int(round(tokens_per_tile**0.5))
    if side % 2:
        raise ConfigError(f"flash_mode needs an even pixel-shuffled grid, got {side}×{side} tokens per tile")
    return FlashConfig(values["flash_relative_threshold"], values["flash_absolute_threshold"], (side // 2) ** 2)


def route(gate: np.ndarray, flash: FlashConfig) -> np.ndarray:
    # gate: [T] "compress" probabilities of one request's tiles -> bool [T]: True = q tokens
    import torch  # here: engine.config (and the light Triton stubs) import this module

    scores = torch.from_numpy(np.ascontiguousarray(gate))
    threshold = torch.quantile(scores.float(), flash.relative_threshold)
    return ((scores > threshold) & (scores >= flash.absolute_threshold)).numpy()


def assemble(table: np.ndarray, compressed: np.ndarray, gate: np.ndarray, flash: FlashConfig) -> tuple[np.ndarray, np.ndarray]:
    """One request's routed prompt table.
    table [T·Q, H] (256-token path), compressed [T·q, H] (64-token path), gate [T]
    -> table [T·Q, H] (a compressed tile's rows q..Q-1 zero: never read), tile_tokens int32 [T]."""
    tiles = len(gate)
    if not tiles:
        return table, np.zeros(0, np.int32)
    full = table.shape[0] // tiles
    q = flash.compressed_tokens_per_tile
    mask = route(gate, flash)
    out = table.reshape(tiles, full, -1).copy()
    out[mask] = 0
    out[mask, :q] = compressed.reshape(tiles, q, -1)[mask]
    return out.reshape(tiles * full, -1), np.where(mask, q, full).astype(np.int32)


def drop_compressed(input_ids: np.ndarray, vocab_size: int, tokens_per_tile: int, tile_tokens: np.ndarray) -> np.ndarray:
    """Removes the prompt positions that read unused table rows (row k of tile k // Q, slot k % Q ≥ its
    token count): the compressed tiles' extra positions, as compress_visual_tokens_in_sentence does.
    input_ids int32 [L] -> [L'] ; tile_tokens int32 [T]."""
    rows = input_ids.astype(np.int64) - vocab_size
    image = rows >= 0
    if not image.any():
        return input_ids
    tile = np.where(image, rows // tokens_per_tile, 0)
    if int(tile.max()) >= len(tile_tokens):
        raise ValueError(f"input_ids read tile {int(tile.max())} but the request has {len(tile_tokens)} tiles")
    return input_ids[~image | (rows % tokens_per_tile < tile_tokens[tile])]
