"""build.dense_labels: each image token's targets say what the pixels of its cell show, for the tiles the
real preprocessing cuts (grid, stretch, order, thumbnail), and token k is the cell transformers' pixel
shuffle puts there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from build.dense_labels import GRID, tile_targets
from build.scenes import COLORS, SHAPES, draw_scene
from engine.preprocess import load_images

CELL = 448 // GRID
PALETTE = np.array(list(COLORS.values()), np.float32)  # [8, 3]


def _cell_colours(tiles: np.ndarray) -> np.ndarray:
    """The reference read from the pixels: per tile and cell, the share of its pixels within 40 of each
    shape colour (the backgrounds are muted mid-tones, far from all of them) -> [T, 256, 8]."""
    pixels = tiles.transpose(0, 2, 3, 1).astype(np.float32)  # [T, 448, 448, 3]
    near = np.linalg.norm(pixels[..., None, :] - PALETTE, axis=-1) < 40  # [T, 448, 448, 8]
    cells = near.reshape(len(tiles), GRID, CELL, GRID, CELL, len(PALETTE)).mean(axis=(2, 4))
    return cells.reshape(len(tiles), GRID * GRID, len(PALETTE))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_num", [1, 6, 12])
def test_each_token_target_matches_the_pixels_of_its_cell(seed, max_num):
    rng = np.random.default_rng([seed, max_num])
    checked = 0
    for _ in range(3):
        scene = draw_scene(rng)
        tiles, (count,) = load_images([scene.image], max_num=max_num, normalize=False)
        targets = tile_targets(scene, max_num)
        assert targets.colour.shape == targets.shape.shape == targets.centre.shape == (count, GRID * GRID)
        shares = _cell_colours(tiles)
        solid = shares.max(-1) > 0.6  # well inside one shape: its colour is the target
        assert np.array_equal(targets.colour[solid], shares[solid].argmax(-1))
        empty = shares.max(-1) < 0.02  # no shape pixels: background on both targets
        assert (targets.colour[empty] == len(COLORS)).all() and (targets.shape[empty] == len(SHAPES)).all()
        colour_of_shape = {(list(COLORS).index(i.color), SHAPES.index(i.shape)) for i in scene.items}
        covered = targets.colour < len(COLORS)
        assert np.array_equal(covered, targets.shape < len(SHAPES))
        assert {(int(c), int(s)) for c, s in zip(targets.colour[covered], targets.shape[covered])} <= colour_of_shape
        checked += int(solid.sum())
    assert checked > 20  # solid cells were compared (a 1-tile scene of small shapes has few)


@pytest.mark.parametrize("size", [(448, 448), (1920, 1080), (400, 1600)])
def test_each_shape_centre_is_flagged_once_in_the_grid_and_once_in_the_thumbnail(size):
    rng = np.random.default_rng(3)
    for _ in range(5):
        scene = draw_scene(rng, size=size)
        targets = tile_targets(scene, 12)
        grid_tiles = len(targets.centre) - (len(targets.centre) > 1)
        assert targets.centre[:grid_tiles].sum() == len(scene.items)
        if grid_tiles < len(targets.centre):
            assert targets.centre[grid_tiles:].sum() == len(scene.items)


def test_token_k_is_cell_k_of_the_pixel_shuffle():
    # patch features holding their own (row, column): [1, 32, 32, 2], as get_image_features reshapes them
    rows, cols = torch.meshgrid(torch.arange(2 * GRID), torch.arange(2 * GRID), indexing="ij")
    patches = torch.stack([rows, cols], -1)[None].float()
    shuffled = InternVLModel.pixel_shuffle(None, patches, scale_factor=0.5).reshape(GRID * GRID, -1, 2)  # token -> its 4 patches
    for k in range(GRID * GRID):
        assert set((shuffled[k, :, 0] // 2).tolist()) == {k // GRID} and set((shuffled[k, :, 1] // 2).tolist()) == {k % GRID}
