"""Dense targets for the shapes demo tower (build/train_demo.py, stage 1): what each image token sees.

After pixel shuffle a 448 px tile is 16×16 tokens, each the 28×28 px cell of the tile it came from
(token k = row k // 16, column k % 16). For every tile the real dynamic preprocessing cuts from a scene
(engine/preprocess.py: the grid, stretched, row-major, then the thumbnail), each token gets
- colour: the colour of the shape that covers most of its cell (index into COLORS), or BACKGROUND;
- shape: that shape's index into SHAPES, or BACKGROUND;
- centre: whether a shape's centre falls in the cell (counting reads these).
A cell counts as covered when a shape covers COVERED of its area. Masks are drawn as the scene was (build/scenes.py
draw_mask), at SUPERSAMPLE² points per cell in the stretched geometry each tile sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from build.scenes import COLORS, SHAPES, Scene, draw_mask
from engine.preprocess import tile_grid

GRID = 16  # tokens per tile side after pixel shuffle: 448 / 14 / 2
SUPERSAMPLE = 4
COVERED = 0.5  # half the cell: a shape edge the mask draws one sample wider (PIL includes x1, y1) stays below it


@dataclass(frozen=True)
class TileTargets:
    colour: np.ndarray  # [T, 256] int64 in [0, len(COLORS)], len(COLORS) = background
    shape: np.ndarray  # [T, 256] int64 in [0, len(SHAPES)], len(SHAPES) = background
    centre: np.ndarray  # [T, 256] bool


def _region_targets(scene: Scene, cols: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of the whole image stretched to cols × rows tiles -> three [rows*16, cols*16] arrays."""
    width, height = scene.image.size
    cells_x, cells_y = cols * GRID, rows * GRID
    sx, sy = cells_x * SUPERSAMPLE / width, cells_y * SUPERSAMPLE / height
    coverage = np.zeros((len(scene.items), cells_y, cells_x), np.float32)
    centre = np.zeros((cells_y, cells_x), bool)
    for n, item in enumerate(scene.items):
        mask = Image.new("L", (cells_x * SUPERSAMPLE, cells_y * SUPERSAMPLE), 0)
        draw_mask(ImageDraw.Draw(mask), item, sx, sy)
        pixels = np.asarray(mask, np.float32).reshape(cells_y, SUPERSAMPLE, cells_x, SUPERSAMPLE) / 255
        coverage[n] = pixels.mean(axis=(1, 3))
        x0, y0, x1, y1 = item.box
        cx, cy = min(int((x0 + x1) / 2 * cells_x / width), cells_x - 1), min(int((y0 + y1) / 2 * cells_y / height), cells_y - 1)
        centre[cy, cx] = True
    colour = np.full((cells_y, cells_x), len(COLORS), np.int64)
    shape = np.full((cells_y, cells_x), len(SHAPES), np.int64)
    if scene.items:
        top = coverage.argmax(0)
        covered = coverage.max(0) >= COVERED
        colour[covered] = np.array([list(COLORS).index(i.color) for i in scene.items])[top[covered]]
        shape[covered] = np.array([SHAPES.index(i.shape) for i in scene.items])[top[covered]]
    return colour, shape, centre


def _tiles(region: np.ndarray, cols: int, rows: int) -> np.ndarray:
    # [rows*16, cols*16] -> [rows*cols, 256], tiles row-major, tokens row-major within a tile
    return region.reshape(rows, GRID, cols, GRID).transpose(0, 2, 1, 3).reshape(rows * cols, GRID * GRID)


def tile_targets(scene: Scene, max_num: int, use_thumbnail: bool = True) -> TileTargets:
    """The targets of the tiles load_images(scene.image, max_num=max_num) returns, in its order."""
    width, height = scene.image.size
    cols, rows, count = tile_grid(width, height, max_num=max_num, use_thumbnail=use_thumbnail)
    parts = [tuple(_tiles(a, cols, rows) for a in _region_targets(scene, cols, rows))]
    if count > cols * rows:  # the thumbnail: the whole image in one tile
        parts.append(_region_targets(scene, 1, 1))
        parts[-1] = tuple(a.reshape(1, GRID * GRID) for a in parts[-1])
    colour, shape, centre = (np.concatenate(p) for p in zip(*parts))
    return TileTargets(colour, shape, centre)
