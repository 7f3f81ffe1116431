"""engine/preprocess.py iter_images (and load_images, which runs on the same overlapped jobs): the next
image decodes while the one before it resizes; results equal one-at-a-time loading, in order, and one
image's error is that image's alone."""

import io
import os
import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from engine import preprocess
from engine.image_features import ImageFeatureSource, RequestImages
from engine.preprocess import ImageError, iter_images, load_image, load_images
from engine.vision_cache import VisionCache
from tests import reference_preprocess as ref

# (width, height, format): different tile counts, so a result in the wrong place shows in its shape
SHAPES = [(1280, 720, "JPEG"), (300, 900, "PNG"), (640, 480, "JPEG"), (1000, 250, "PNG"), (448, 448, "JPEG")]


def encoded(width, height, fmt, seed):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.linspace(0, 255, width)[None, :, None] + rng.integers(-50, 50, (height, width, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


IMAGES = [encoded(w, h, fmt, seed) for seed, (w, h, fmt) in enumerate(SHAPES)]


def test_stream_equals_one_image_at_a_time_in_order():
    streamed = list(iter_images(IMAGES, max_num=6))
    assert len(streamed) == len(IMAGES)
    for data, pixels in zip(IMAGES, streamed):
        np.testing.assert_array_equal(pixels, load_image(data, max_num=6))
    np.testing.assert_array_equal(streamed[2], ref.load_image(io.BytesIO(IMAGES[2]), max_num=6).numpy())
    tiles, counts = load_images(IMAGES, max_num=6, normalize=False)
    assert counts == [len(p) for p in streamed]
    np.testing.assert_array_equal(np.concatenate(list(iter_images(IMAGES, max_num=6, normalize=False))), tiles)


def test_max_num_per_image():
    max_nums = [1, 12, 2, 6, 3]
    for data, m, pixels in zip(IMAGES, max_nums, iter_images(IMAGES, max_num=max_nums)):
        np.testing.assert_array_equal(pixels, load_image(data, max_num=m))
    with pytest.raises(ValueError, match="2 entries for 5 images"):
        list(iter_images(IMAGES, max_num=[1, 2]))


def test_a_failing_image_is_reported_for_that_image_and_the_others_go_on():
    images = [IMAGES[0], b"not an image", IMAGES[1], IMAGES[2][:2000], b"", IMAGES[3]]
    results = list(iter_images(images, max_num=4, names=[10, 11, 12, 13, 14, 15]))
    errors = {i: str(r) for i, r in enumerate(results) if isinstance(r, ImageError)}
    assert sorted(errors) == [1, 3, 4]
    assert errors[1].startswith("image 11: cannot decode image")
    assert errors[3].startswith("image 13: ") and errors[4] == "image 14: image is empty (0 bytes)"
    for i, data in [(0, IMAGES[0]), (2, IMAGES[1]), (5, IMAGES[3])]:
        np.testing.assert_array_equal(results[i], load_image(data, max_num=4))
    with pytest.raises(ImageError, match="image 1: cannot decode"):  # load_images: the whole call fails
        load_images(images[:3], max_num=4)


def test_max_pixels_and_wrong_types():
    results = list(iter_images([IMAGES[2], IMAGES[0]], max_pixels=640 * 480))
    assert isinstance(results[1], ImageError) and "image 1: 1280×720 is 921600 pixels" in str(results[1])
    with pytest.raises(TypeError, match="image 1: image must be a path"):
        list(iter_images([IMAGES[0], 42]))


def test_decode_of_the_next_image_overlaps_the_resize_of_this_one(monkeypatch):
    # A slow grid resize: the next image's decode must start while it runs.
    monkeypatch.setattr(preprocess, "_POOL", ThreadPoolExecutor(max_workers=2))
    events, lock = [], threading.Lock()
    decode, fill = preprocess._decode, preprocess._fill

    def logged(name, fn):
        def run(*args, **kwargs):
            with lock:
                events.append((name, "start", time.perf_counter()))
            result = fn(*args, **kwargs)
            with lock:
                events.append((name, "end", time.perf_counter()))
            return result

        return run

    def slow_fill(*args, **kwargs):
        time.sleep(0.3)
        return fill(*args, **kwargs)

    monkeypatch.setattr(preprocess, "_decode", logged("decode", decode))
    monkeypatch.setattr(preprocess, "_fill", logged("fill", slow_fill))
    list(iter_images(IMAGES[:3]))
    fills = [t for name, what, t in events if name == "fill" and what == "end"]
    decodes = [t for name, what, t in events if name == "decode" and what == "start"]
    assert len(decodes) == 3 and decodes[1] < fills[0] and decodes[2] < fills[1]


def test_stopping_early_drops_the_images_not_started():
    stream = iter_images(IMAGES * 4)
    first = next(stream)
    stream.close()
    np.testing.assert_array_equal(first, load_image(IMAGES[0]))


class TableEncoder:
    """Stand-in vision encoder: one row per tile, its first 4 uint8 values."""

    def encode_requests(self, tiles_per_request):
        return [(t.reshape(len(t), -1)[:, :4].astype(np.float32), np.ones(len(t), np.int32)) for t in tiles_per_request]


def test_feature_source_streams_every_requests_images_and_keeps_errors_per_request():
    config = SimpleNamespace(vision=SimpleNamespace(image_size=448), min_num=1, use_thumbnail=True, flash=None)
    source = ImageFeatureSource(TableEncoder(), VisionCache(1 << 20), config)
    requests = [
        RequestImages([IMAGES[0], IMAGES[1]], ["a", "b"], max_tiles=4),
        RequestImages([IMAGES[2], b"broken"], ["c", "d"], max_tiles=6),
        RequestImages([IMAGES[3]], ["e"], max_tiles=2),
    ]
    results = source.features(requests)
    assert isinstance(results[1], ImageError) and str(results[1]).startswith("image 1: cannot decode")
    for request, result in zip([requests[0], requests[2]], [results[0], results[2]]):
        tiles, counts = load_images(request.images, max_num=request.max_tiles, normalize=False)
        assert result.num_tiles == counts
        np.testing.assert_array_equal(result.table, tiles.reshape(len(tiles), -1)[:, :4])


def test_a_forked_child_loads_images_with_a_pool_of_its_own():
    # a DataLoader worker (build/train_demo.py) forks after the pool's threads started: the child must
    # not wait on threads it does not have
    image = encoded(640, 480, "JPEG", 0)
    expected = load_images([image])[0]  # the parent's pool threads are running now
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        ok = np.array_equal(load_images([image])[0], expected)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    ready = select.select([read], [], [], 60)[0]
    result = os.read(read, 1) if ready else b"timeout"
    if not ready:
        os.kill(child, 9)
    os.waitpid(child, 0)
    assert result == b"1"
