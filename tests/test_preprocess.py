import io
import re
import threading
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from engine.preprocess import ImageError, load_image, load_images, normalize_tiles, tile_grid
from tests import reference_preprocess as ref

S = 448


@pytest.fixture(scope="module", autouse=True)
def single_threaded_torch():
    # The reference's per-tile torch ops are tiny: OpenMP threads only add spin-waiting that slows
    # everything else down on a small machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def random_image(width, height, seed=0):
    # Gradients plus noise: smooth enough for the resizes to matter, varied enough to catch any offset.
    # Cached, so callers must not modify the image.
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = (x * [1, 0, 0.5] + y * [0, 1, 0.5]).astype(np.float32) + rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(im, fmt):
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def reference(image, **kwargs):
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
    return ref.load_image(source, **kwargs).numpy()


def assert_matches(ours, expected):
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= 1e-6


def check_against_reference(im, **kwargs):
    ours = load_image(im, **kwargs)
    assert_matches(ours, reference(im, **kwargs))
    return ours


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", [(5000, 40), (40, 5000), (3000, 500), (300, 2000)])
def test_tiling_matches_reference_for_panoramas(size, max_num):
    check_against_reference(random_image(*size), max_num=max_num)


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (3, 2), (17, 5), (64, 64)])
def test_tiling_matches_reference_for_tiny_images(size, max_num):
    check_against_reference(random_image(*size), max_num=max_num)


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", [(448, 448), (896, 448), (448, 896), (1344, 896)])
def test_tiling_matches_reference_for_exact_multiples_of_the_tile_size(size, max_num):
    check_against_reference(random_image(*size), max_num=max_num)


# 300x300: square grids tie and the small area keeps 1x1; 896x896: the area rule picks 2x2 over 1x1
# but not 3x3; 500x400 / 2240x1792: aspect 1.25 is equally far from 1x1/2x2 and 3x2.
@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", [(300, 300), (896, 896), (1400, 1400), (500, 400), (2240, 1792)])
def test_tiling_matches_reference_for_aspect_ratio_ties(size, max_num):
    check_against_reference(random_image(*size), max_num=max_num)


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (449, 447), (447, 449), (1234, 567), (640, 480)])
def test_tiling_matches_reference_for_photo_sizes(size, max_num):
    check_against_reference(random_image(*size), max_num=max_num)


def test_min_num_and_no_thumbnail_match_reference():
    im = random_image(500, 400)
    # min_num=max_num=2 leaves only 1x2 and 2x1, which tie at aspect 1.25: the set order picks 1x2.
    assert tile_grid(500, 400, max_num=2, min_num=2) == (1, 2, 3)
    assert check_against_reference(im, min_num=2, max_num=2).shape[0] == 3
    assert check_against_reference(im, min_num=3, max_num=8).shape[0] == 5
    assert check_against_reference(random_image(1920, 1080), use_thumbnail=False).shape[0] == 8


def test_other_input_size_matches_reference():
    check_against_reference(random_image(700, 300), input_size=224, max_num=6)


def test_normalization_is_bit_exact_for_every_pixel_value():
    # A 448x448 image is its own 1x1 grid, so every pixel value reaches the normalization unchanged.
    values = np.arange(S * S * 3, dtype=np.uint32).reshape(S, S, 3) % 256
    im = Image.fromarray(values.astype(np.uint8))
    assert np.array_equal(load_image(im), reference(im))


MODES = {
    "RGB": lambda im: im,
    "L": lambda im: im.convert("L"),
    "P": lambda im: im.quantize(64, method=Image.Quantize.FASTOCTREE),
    "RGBA": lambda im: Image.merge("RGBA", (*im.split(), im.convert("L").point(lambda v: 255 - v))),
    "LA": lambda im: Image.merge("LA", (im.convert("L"), im.getchannel("R"))),
    "CMYK": lambda im: im.convert("CMYK"),
    "I;16": lambda im: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 3),
}
ENCODABLE = {"JPEG": ["RGB", "L", "CMYK"], "PNG": ["RGB", "L", "P", "RGBA", "LA", "I;16"]}


@lru_cache(maxsize=None)
def encoded_sample(fmt, mode):
    # -> (encoded bytes, reference pixel_values at max_num=6), shared by the three input kinds
    data = encode(MODES[mode](random_image(900, 500, seed=1)), fmt)
    return data, reference(data, max_num=6)


@pytest.mark.parametrize("source", ["path", "bytes", "pil"])
@pytest.mark.parametrize("fmt, mode", [(fmt, mode) for fmt, modes in ENCODABLE.items() for mode in modes])
def test_modes_and_encodings_match_reference(fmt, mode, source, tmp_path):
    data, expected = encoded_sample(fmt, mode)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    if source == "pil":
        with Image.open(path) as image:
            assert_matches(load_image(image, max_num=6), expected)
    else:
        assert_matches(load_image(str(path) if source == "path" else data, max_num=6), expected)


def test_pil_input_is_used_as_given_and_left_open():
    im = MODES["P"](random_image(900, 500))
    before = im.tobytes()
    assert_matches(load_image(im), reference(im))
    assert im.mode == "P" and im.tobytes() == before


def test_animated_gif_uses_the_first_frame_like_reference():
    frames = [MODES["P"](random_image(600, 300, seed=s)) for s in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert_matches(load_image(buf.getvalue()), reference(buf.getvalue()))


def test_load_images_concatenates_per_image_results(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(random_image(300, 900, seed=3), "PNG"))
    images = [
        random_image(1920, 1080, seed=1),
        encode(random_image(640, 480, seed=2), "JPEG"),
        path,
        random_image(1, 1),
        MODES["CMYK"](random_image(5000, 40, seed=4)),
        bytearray(encode(random_image(448, 448, seed=5), "PNG")),
        memoryview(encode(random_image(1000, 1000, seed=6), "JPEG")),
    ]
    pixel_values, counts = load_images(images, max_num=12)
    expected = [reference(image) for image in images]
    assert counts == [len(e) for e in expected]
    assert_matches(pixel_values, np.concatenate(expected))


def test_load_images_handles_one_and_zero_images():
    im = random_image(800, 600)
    pixel_values, counts = load_images([im], max_num=6)
    assert counts == [len(pixel_values)]
    assert_matches(pixel_values, reference(im, max_num=6))
    pixel_values, counts = load_images([])
    assert pixel_values.shape == (0, 3, S, S) and counts == []


@pytest.mark.parametrize("count", [1, 3])
def test_uint8_tiles_normalize_to_the_reference_bit_for_bit(count):
    """The serving path: uint8 tiles now, normalization later (the vision encoder's first step)."""
    images = [random_image(1200 - 300 * i, 700, seed=10 + i) for i in range(count)]
    tiles, counts = load_images(images, max_num=6, normalize=False, max_total_tiles=100)
    assert tiles.dtype == np.uint8 and tiles.shape == (sum(counts), 3, S, S)
    expected = np.concatenate([reference(im, max_num=6) for im in images])
    assert_matches(normalize_tiles(tiles), expected)
    assert np.array_equal(load_images([], normalize=False)[0], np.zeros((0, 3, S, S), np.uint8))


def test_concurrent_callers_get_correct_results():
    images = [random_image(900, 600, seed=s) for s in range(4)]
    expected = [reference(im) for im in images]
    results = [None] * len(images)

    def run(i):
        results[i] = load_image(images[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ours, exp in zip(results, expected):
        assert_matches(ours, exp)


def test_tile_grid_agrees_with_reference_grid_choice():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 4000, (300, 2))]
    sizes += [(w, h) for w in (1, 224, 448, 500, 896, 1344) for h in (1, 224, 400, 448, 896, 1792)]
    for min_num, max_num in [(1, 1), (1, 6), (1, 12), (2, 2), (3, 8), (1, 24)]:
        for w, h in sizes:
            cols, rows = ref.choose_grid(w, h, min_num, max_num, S)
            has_thumbnail = cols * rows != 1
            assert tile_grid(w, h, S, max_num, min_num) == (cols, rows, cols * rows + has_thumbnail), (w, h)
            assert tile_grid(w, h, S, max_num, min_num, use_thumbnail=False) == (cols, rows, cols * rows)


def test_tile_grid_counts_match_loaded_tiles():
    assert tile_grid(1920, 1080) == (4, 2, 9)
    assert tile_grid(448, 448) == (1, 1, 1)
    assert len(load_image(random_image(1920, 1080))) == 9


def truncated(fmt):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)), fmt)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "image is empty (0 bytes)"),
        (bytearray(), "image is empty (0 bytes)"),
        (truncated("JPEG"), "cannot decode image: image file is truncated"),
        (truncated("PNG"), "cannot decode image: image file is truncated"),
        (np.random.default_rng(0).bytes(5000), "cannot decode image: not a recognised image format"),
    ],
    ids=["empty-bytes", "empty-bytearray", "truncated-jpeg", "truncated-png", "random-bytes"],
)
def test_bad_image_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match="^" + re.escape(message)):
        load_image(data)


def test_bad_image_files_raise_image_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("definitely not an image\n")
    with pytest.raises(ImageError, match="cannot decode image .*notes.txt.*: not a recognised image format"):
        load_image(text)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"image is empty \(0 bytes\).*empty.jpg"):
        load_image(str(empty))
    with pytest.raises(ImageError, match="cannot open image file .*missing.jpg.*No such file"):
        load_image(tmp_path / "missing.jpg")


def test_truncated_file_raises_instead_of_padding_gray(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated("JPEG"))
    with pytest.raises(ImageError, match="truncated"):
        load_image(path)


def test_wrong_argument_types_raise_type_error():
    for bad in (123, None, ["a.jpg"], np.zeros((4, 4, 3), np.uint8)):
        with pytest.raises(TypeError, match="image must be a path, encoded bytes or a PIL.Image.Image"):
            load_image(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_size": 0}, "input_size must be a positive integer"),
        ({"input_size": 448.0}, "input_size must be a positive integer"),
        ({"max_num": 0}, "max_num must be a positive integer"),
        ({"min_num": 0}, "min_num must be a positive integer"),
        ({"min_num": 5, "max_num": 4}, r"min_num \(5\) must not exceed max_num \(4\)"),
    ],
)
def test_invalid_parameters_raise_value_error(kwargs, message):
    im = random_image(10, 10)
    with pytest.raises(ValueError, match=message):
        load_image(im, **kwargs)
    with pytest.raises(ValueError, match=message):
        load_images([im, im], **kwargs)
    with pytest.raises(ValueError, match=message):
        tile_grid(10, 10, **kwargs)


def test_tile_grid_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="image size must be positive integers"):
        tile_grid(0, 10)


def test_load_images_names_the_failing_image(tmp_path):
    good = encode(random_image(300, 200), "PNG")
    with pytest.raises(ImageError, match=r"^image 2: image is empty \(0 bytes\)"):
        load_images([good, good, b""])
    with pytest.raises(ImageError, match="^image 1: cannot decode image: not a recognised image format"):
        load_images([good, b"not an image", good])
    with pytest.raises(ImageError, match="^image 2: cannot decode image: image file is truncated"):
        load_images([good, good, truncated("JPEG"), good])
    with pytest.raises(ImageError, match="^image 1: cannot open image file .*missing.png"):
        load_images([good, tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="^image 0: cannot decode image"):
        load_images([truncated("PNG")])
    with pytest.raises(TypeError, match="^image 1: image must be"):
        load_images([good, 42])
