"""engine/resize.py: the split bicubic resize is byte-identical to one Pillow call, in every case it takes."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from engine import preprocess, resize
from engine.preprocess import load_image, load_images, normalize_tiles, tile_grid
from tests import reference_preprocess as ref

S = 448
POOL = ThreadPoolExecutor(max_workers=2)
RESIZE_BLOCKS = resize.resize_blocks


def noise(width, height, mode="RGB", seed=0):
    # Pure noise: every pixel matters, the worst case for any misplaced window or rounding
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, 3)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def assert_same_as_pillow(im, size, parts=2):
    expected = im.resize(size, Image.Resampling.BICUBIC)
    ours = resize.resize(im, size, POOL, parts)
    assert ours.mode == expected.mode and ours.size == expected.size
    assert ours.tobytes() == expected.tobytes(), f"{im.mode} {im.size} -> {size}"


def random_size_pairs(count, seed, high):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield tuple(int(v) for v in rng.integers(1, high, 2)), tuple(int(v) for v in rng.integers(1, high, 2))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_split_resize_equals_pillow_for_random_sizes(mode):
    vertical_first = 0
    for src, dst in random_size_pairs(300, seed=1, high=300):
        vertical_first += resize.vertical_first(src, dst)
        assert_same_as_pillow(noise(*src, mode=mode, seed=src[0]), dst, parts=2 + src[0] % 3)
    assert 50 < vertical_first < 250  # both orders well covered


def test_split_resize_equals_pillow_for_large_sizes():
    for src, dst in random_size_pairs(8, seed=2, high=2500):
        assert_same_as_pillow(noise(*src, seed=src[1]), dst)


@pytest.mark.parametrize(
    "src, dst",
    [
        ((640, 480), (1792, 896)),  # upscale both
        ((1280, 720), (1792, 896)),  # the usual 4x2 grid, height up, width down
        ((1920, 1080), (1920, 1344)),  # width unchanged: vertical pass only
        ((1920, 1080), (896, 1080)),  # height unchanged: horizontal pass only
        ((1920, 1080), (1920, 540)),  # width unchanged, height reduced: vertical only, split
        ((448, 448), (448, 448)),  # same size: Pillow copies
        ((1, 1), (448, 448)),
        ((1, 500), (1, 7)),
        ((500, 1), (3, 1)),
        ((3, 2), (1, 1)),
        ((17, 5), (896, 448)),
        ((5000, 40), (5376, 448)),
        ((40, 5000), (448, 5376)),
        ((1920, 1080), (1792, 896)),  # H - h = 184 <= 2 (W - w) = 256: horizontal first
        ((1920, 1080), (1792, 850)),  # H - h = 230: still horizontal first
        ((1920, 1080), (1792, 823)),  # H - h = 257 > 256: vertical first
        ((20, 1529), (1186, 1106)),  # width grows, height shrinks: vertical first
    ],
)
def test_split_resize_equals_pillow_for_edge_sizes(src, dst):
    assert_same_as_pillow(noise(*src), dst)


def test_split_resize_equals_pillow_for_the_tile_grids_of_many_image_sizes():
    rng = np.random.default_rng(3)
    sizes = [tuple(int(v) for v in rng.integers(16, 2400, 2)) for _ in range(40)]
    for width, height in sizes + [(1920, 1080), (1080, 1920), (1280, 720), (800, 600), (3000, 500), (300, 2000)]:
        cols, rows, _ = tile_grid(width, height)
        im = noise(width, height, seed=width)
        assert_same_as_pillow(im, (cols * S, rows * S))
        assert_same_as_pillow(im, (S, S))  # the thumbnail's size


def test_modes_pillow_resizes_differently_are_left_to_pillow():
    im = noise(64, 48, mode="RGBA")
    assert not resize.can_split(im)
    assert_same_as_pillow(im, (128, 96))
    with pytest.raises(ValueError, match="not split exactly"):
        resize.resize_blocks(im, (128, 96), POOL, 2)


def test_pass_order_is_pillows():
    # Which order Pillow took shows in its result: the two orders round differently on noise.
    def two_calls(im, size, vertical_first):
        (w, h), (src_w, src_h) = size, im.size
        mid = im.resize((src_w, h) if vertical_first else (w, src_h), Image.Resampling.BICUBIC)
        return mid.resize(size, Image.Resampling.BICUBIC).tobytes()

    told = 0
    for src, dst in random_size_pairs(400, seed=4, high=120):
        im = noise(*src, mode="L", seed=src[1])
        pillow = im.resize(dst, Image.Resampling.BICUBIC).tobytes()
        ours, other = (two_calls(im, dst, v) for v in (resize.vertical_first(src, dst), not resize.vertical_first(src, dst)))
        assert ours == pillow, (src, dst)
        told += other != pillow
    assert told > 200


def test_splits_cover_the_range_in_non_empty_pieces():
    assert resize.splits(1, 2) == [(0, 1)]
    assert resize.splits(5, 2) == [(0, 2), (2, 5)]
    assert resize.splits(7, 3) == [(0, 2), (2, 4), (4, 7)]


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (1000, 1000), (1920, 1080), (1000, 3000)])
def test_load_image_with_split_grid_resize_matches_reference(size, monkeypatch):
    # grids 1792x896 (upscaled), 896x1792, 1344x1344, 1792x896 (downscaled), 896x2688 (vertical first)
    im = noise(*size, seed=5)
    cols, rows, _ = tile_grid(*size)
    assert resize.vertical_first(size, (cols * S, rows * S)) == (size == (1000, 3000))
    calls = []
    monkeypatch.setattr(preprocess, "_core_to_spare", lambda: True)  # whatever the machine's load
    monkeypatch.setattr(resize, "resize_blocks", lambda *a: calls.append(a) or RESIZE_BLOCKS(*a))
    expected = ref.load_image(im).numpy()
    for _ in range(3):  # the pool's hand-offs differ from run to run
        ours = load_image(im)
        assert ours.shape == expected.shape and np.abs(ours - expected).max() <= 1e-6
    tiles, counts = load_images([im], normalize=False)
    np.testing.assert_array_equal(normalize_tiles(tiles), ours)
    assert len(calls) == 4


def test_grid_resize_is_one_call_without_a_core_to_spare(monkeypatch):
    calls = []
    monkeypatch.setattr(preprocess, "_core_to_spare", lambda: False)
    monkeypatch.setattr(resize, "resize_blocks", lambda *a: calls.append(a) or RESIZE_BLOCKS(*a))
    im = noise(1280, 720, seed=6)
    np.testing.assert_array_equal(load_image(im), ref.load_image(im).numpy())
    assert not calls
