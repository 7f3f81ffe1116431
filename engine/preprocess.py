"""InternVL image preprocessing: dynamic tiling into S x S tiles plus ImageNet normalization.

Bit-exact with the model card's `load_image` (PIL bicubic resize of the whole grid, crops, a thumbnail,
torchvision ToTensor + Normalize per tile), but without per-tile tensors: every tile is normalized
straight from the resized grid image into one preallocated float32 array, and the independent PIL
work (which releases the GIL) runs on a thread pool sized to the process's CPUs: one image's
thumbnail beside its grid resize, the grid resize itself split over the pool (engine/resize.py)
when a core is idle, and for several images (load_images, iter_images) the next image's decode
beside the previous one's resizes.

`load_images(..., normalize=False)` stops before the normalization and returns the uint8 tiles: the
serving path hands those to the vision encoder, which normalizes them in its graph with the same
float32 operations (`normalize_tiles` here is the reference). A quarter of the bytes cross each
process/device boundary.
"""

import io
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import lru_cache, partial

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)[:, None, None]  # [3, 1, 1]
_STD = np.array(IMAGENET_STD, dtype=np.float32)[:, None, None]  # [3, 1, 1]

_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="preprocess")


def _new_pool_after_fork() -> None:
    # A forked child (a DataLoader worker, a server's worker process) inherits the pool object but not
    # its threads: work submitted there would never run. The child gets a pool of its own.
    global _POOL
    _POOL = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="preprocess")


os.register_at_fork(after_in_child=_new_pool_after_fork)
# A grid resize whose intermediate image has fewer pixels than this runs as one call: thread hand-offs
# would cost more than they save.
_SPLIT_MIN_PIXELS = 1 << 18
# Pillow frees an image's memory blocks (at most 16 MB each) at once by default, so every decode and
# resize page-faults fresh memory: half the minor faults of a 1920x1080 load_image, ~6% of its CPU
# here (docs/PERFORMANCE.md). Keep some for reuse, unless the deployment chose (PILLOW_BLOCKS_MAX).
_PIL_BLOCKS_KEPT = 16
if "PILLOW_BLOCKS_MAX" not in os.environ and Image.core.get_blocks_max() == 0:
    Image.core.set_blocks_max(_PIL_BLOCKS_KEPT)


def _core_to_spare():
    # The split grid resize pays only with an idle core: its extra copies cost ~11% more CPU, and with
    # the cores busy it won nothing back (docs/PERFORMANCE.md). Idle now: the kernel's count of runnable
    # threads (/proc/loadavg, 4th field; it counts the caller) leaves a core free. The 1-minute load
    # average, used before, lags and counts our own last minute of work.
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        running = os.getloadavg()[0] + 1
    return _WORKERS > 1 and running < _WORKERS


# What PIL raises for corrupt, truncated or unrecognised data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class ImageError(ValueError):
    """The image input is empty, unreadable or cannot be decoded."""


def _check_params(input_size, max_num, min_num):
    for name, value in (("input_size", input_size), ("max_num", max_num), ("min_num", min_num)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_num > max_num:
        raise ValueError(f"min_num ({min_num}) must not exceed max_num ({max_num})")


@lru_cache(maxsize=None)
def _candidate_grids(min_num, max_num):
    # -> (cols, rows) grids by tile count. The very expression of the reference: sorted() is stable,
    # so the order of equal-area grids (which decides ties) is the set's iteration order.
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return tuple(sorted(target_ratios, key=lambda x: x[0] * x[1]))


def tile_grid(width, height, input_size=448, max_num=12, min_num=1, use_thumbnail=True):
    """The tiling load_image uses for a width x height image, without touching any pixels."""
    # -> (cols, rows, num_tiles); num_tiles counts the thumbnail, which only multi-tile grids get
    _check_params(input_size, max_num, min_num)
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise ValueError(f"image size must be positive integers, got {width!r} x {height!r}")
    aspect_ratio = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * input_size * input_size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    has_thumbnail = bool(use_thumbnail) and cols * rows != 1
    return cols, rows, cols * rows + has_thumbnail


@contextmanager
def _opened(image):
    # -> PIL image with its header read (pixels not decoded yet); closes any file opened here
    if isinstance(image, Image.Image):
        yield image
        return
    if isinstance(image, (bytes, bytearray, memoryview)):
        if memoryview(image).nbytes == 0:
            raise ImageError("image is empty (0 bytes)")
        fp = io.BytesIO(image)
    elif isinstance(image, (str, os.PathLike)):
        try:
            fp = open(image, "rb")
        except OSError as e:
            raise ImageError(f"cannot open image file {os.fspath(image)!r}: {e.strerror or e}") from e
        if os.fstat(fp.fileno()).st_size == 0:
            fp.close()
            raise ImageError(f"image is empty (0 bytes): {os.fspath(image)!r}")
    else:
        raise TypeError(f"image must be a path, encoded bytes or a PIL.Image.Image, not {type(image).__name__}")
    with fp:
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            source = f" {os.fspath(image)!r}" if isinstance(image, (str, os.PathLike)) else ""
            raise ImageError(
                f"cannot decode image{source}: not a recognised image format (JPEG, PNG, WebP, BMP, GIF, ...)"
            ) from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"cannot decode image: {e}") from e
        yield im


def _decode(im):
    # -> RGB PIL image with its pixels in memory (raises on truncated data: LOAD_TRUNCATED_IMAGES is off)
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode image: {e}") from e


def normalize_tiles(tiles):
    # tiles: uint8 [T, 3, S, S] -> float32 [T, 3, S, S], what load_images(normalize=True) returns
    out = np.empty(tiles.shape, np.float32)
    _normalize(out, tiles)
    return out


def _normalize(out, pixels):
    # Exactly torchvision's float32 ops in its order (x / 255, - mean, / std): bit-identical results.
    np.divide(pixels, np.float32(255), out=out, dtype=np.float32)
    out -= _MEAN
    out /= _STD


def _write_tiles(out, tiles):
    # tiles: RGB PIL image [rows*S, k*S] -> out: [rows, k, 3, S, S] view, written in place
    # (float32: normalized; uint8: the tiles' RGB values)
    rows, k, _, s, _ = out.shape
    pixels = np.asarray(tiles).reshape(rows, s, k, s, 3).transpose(0, 2, 4, 1, 3)  # [rows, k, 3, S, S] uint8
    if out.dtype == np.uint8:
        out[...] = pixels
    else:
        _normalize(out, pixels)


def _write_block(out, pixels, x0, y0):
    # pixels: uint8 [height, width, 3], the grid image's block at (x0, y0)
    # -> out: [rows, cols, 3, S, S], the tile parts it covers written in place (as _write_tiles does)
    s = out.shape[-1]
    y1, x1 = y0 + pixels.shape[0], x0 + pixels.shape[1]
    for r in range(y0 // s, -(-y1 // s)):
        top, bottom = max(y0, r * s), min(y1, (r + 1) * s)
        for c in range(x0 // s, -(-x1 // s)):
            left, right = max(x0, c * s), min(x1, (c + 1) * s)
            part = pixels[top - y0 : bottom - y0, left - x0 : right - x0].transpose(2, 0, 1)  # [3, h, w]
            dest = out[r, c, :, top - r * s : bottom - r * s, left - c * s : right - c * s]
            if out.dtype == np.uint8:
                dest[...] = part
            else:
                _normalize(dest, part)


def _thumbnail_into(out, im):
    # im: RGB PIL image -> out: [1, 1, 3, S, S]
    s = out.shape[-1]
    _write_tiles(out, im.resize((s, s)))


def _fill(out, im, cols, rows, overlap):
    # im: RGB PIL image -> out: [T, 3, S, S]: grid tiles row-major, then the thumbnail if T > cols*rows
    s = out.shape[-1]
    thumbnail = partial(_thumbnail_into, out[-1:, None], im) if len(out) > cols * rows else None
    # Both resizes only read the image and release the GIL, so the pool can do the thumbnail meanwhile;
    # the grid resize itself is split over the pool where that is exact (engine/resize.py) and a core is
    # idle, each thread then writing the tiles of its block.
    size, grid_out = (cols * s, rows * s), out[: cols * rows].reshape(rows, cols, 3, s, s)
    # Only with a core idle now (asked before the thumbnail starts): on a busy machine every hand-off
    # waits for the scheduler, and one thread doing it all in turn was quicker (docs/PERFORMANCE.md).
    spare = overlap and _core_to_spare()
    future = _POOL.submit(thumbnail) if spare and thumbnail else None
    if spare and resize.worth_splitting(im, size, _SPLIT_MIN_PIXELS):
        write = lambda x0, y0, block: _write_block(grid_out, np.asarray(block), x0, y0)
        resize.resize_blocks(im, size, _POOL, _WORKERS, write)
    else:
        _write_tiles(grid_out, im.resize(size))
    if future is None or future.cancel():  # cancelled: still queued behind others' jobs, quicker here
        if thumbnail:
            thumbnail()
    else:
        future.result()


def _load_into(out, im, cols, rows, overlap):
    _fill(out, _decode(im), cols, rows, overlap)


def _overlapped(jobs, ahead):
    """Run jobs (callables taking overlap=) on the pool in order, at most `ahead` of them started before
    the one the caller waits for: with two workers, image i+1 decodes while image i resizes (PIL
    releases the GIL in both). Yields each job's result, or the ImageError/TypeError it raised, in
    order. The last job gets overlap=True (its thumbnail and grid split over the pool): nothing is left
    to keep the other core busy."""
    pending = deque()
    try:
        for k in range(len(jobs)):
            while len(pending) < ahead and k + len(pending) < len(jobs):
                started = k + len(pending)
                pending.append(_POOL.submit(jobs[started], overlap=started == len(jobs) - 1))
            future = pending.popleft()
            try:
                yield future.result()
            except (ImageError, TypeError) as e:
                yield e
    finally:  # the caller stopped early: jobs not started yet are dropped
        for future in pending:
            future.cancel()


def load_image(image, input_size=448, max_num=12, use_thumbnail=True, min_num=1):
    """Decode, tile and normalize one image exactly like the InternVL model card's load_image.

    Raises ImageError for empty, unreadable or undecodable input, TypeError for an unsupported argument.
    """
    # image: path, encoded bytes or PIL image -> pixel_values: [T, 3, S, S] float32, S = input_size
    _check_params(input_size, max_num, min_num)
    with _opened(image) as im:
        im = _decode(im)
    cols, rows, num_tiles = tile_grid(*im.size, input_size, max_num, min_num, use_thumbnail)
    out = np.empty((num_tiles, 3, input_size, input_size), dtype=np.float32)
    _fill(out, im, cols, rows, overlap=True)
    return out


def tile_counts(images, input_size=448, max_num=12, use_thumbnail=True, min_num=1, max_total_tiles=None, max_pixels=None):
    """The tiles each image will give, from the headers alone (nothing is decoded); the same checks and
    errors as load_images. -> [T_i]"""
    _check_params(input_size, max_num, min_num)
    with ExitStack() as stack:
        opened = _open_all(stack, list(images))
        return [n for _, _, n in _grids(opened, input_size, max_num, min_num, use_thumbnail, max_total_tiles, max_pixels)]


def _open_all(stack: ExitStack, images: list, names=None) -> list:
    opened = []
    for i, image in enumerate(images):
        try:
            opened.append(stack.enter_context(_opened(image)))
        except (ImageError, TypeError) as e:
            raise type(e)(f"image {names[i] if names else i}: {e}") from e
    return opened


def _grids(opened, input_size, max_num, min_num, use_thumbnail, max_total_tiles, max_pixels, names=None):
    # Headers give the sizes, hence the tile counts, before anything is decoded. -> [(cols, rows, T_i)]
    for i, im in enumerate(opened):
        if max_pixels is not None and im.width * im.height > max_pixels:
            name = names[i] if names else i
            raise ImageError(f"image {name}: {im.width}×{im.height} is {im.width * im.height} pixels; this deployment allows {max_pixels}")
    grids = [tile_grid(*im.size, input_size, max_num, min_num, use_thumbnail) for im in opened]
    counts = [num_tiles for _, _, num_tiles in grids]
    if max_total_tiles is not None and sum(counts) > max_total_tiles:
        raise ImageError(
            f"the request's {len(counts)} image(s) need {sum(counts)} tiles {counts}; "
            f"this deployment allows at most {max_total_tiles} per request (lower max_tiles or send fewer images)"
        )
    return grids


def load_images(
    images, input_size=448, max_num=12, use_thumbnail=True, min_num=1, max_total_tiles=None, normalize=True, max_pixels=None, names=None
):
    """load_image for several images at once, one image per pool thread (the next one decoding while
    another resizes), the last one started splitting its resizes; errors name the failing image's index
    (or names[i], its index in the request, when these images are some of a request's).

    max_total_tiles: refuse (ImageError) before decoding when the images need more tiles in all.
    max_pixels: refuse (ImageError) an image whose header declares more pixels (decompression bombs).
    normalize=False: uint8 tiles (RGB values before ToTensor + Normalize) instead of float32.
    """
    # images: sequence of what load_image takes
    # -> (pixel_values: [sum T_i, 3, S, S] float32 (uint8 if not normalize), tile counts [T_i]),
    #    image i's tiles in order
    _check_params(input_size, max_num, min_num)
    images = list(images)
    with ExitStack() as stack:
        opened = _open_all(stack, images, names)
        grids = _grids(opened, input_size, max_num, min_num, use_thumbnail, max_total_tiles, max_pixels, names)
        counts = [num_tiles for _, _, num_tiles in grids]
        out = np.empty((sum(counts), 3, input_size, input_size), dtype=np.float32 if normalize else np.uint8)
        starts = np.cumsum([0, *counts]).tolist()
        # Biggest images first, so that no large one is left running alone at the end.
        order = sorted(range(len(opened)), key=lambda i: -opened[i].width * opened[i].height)
        jobs = [partial(_load_into, out[starts[i] : starts[i + 1]], opened[i], *grids[i][:2]) for i in order]
        outcomes = dict(zip(order, _overlapped(jobs, ahead=len(jobs))))  # None, or the image's error
    for i in range(len(opened)):
        if isinstance(outcomes[i], Exception):
            raise type(outcomes[i])(f"image {names[i] if names else i}: {outcomes[i]}") from outcomes[i]
    return out, counts


def iter_images(images, input_size=448, max_num=12, use_thumbnail=True, min_num=1, normalize=True, max_pixels=None, names=None):
    """load_image over a sequence of images, one result per image, in order, each as soon as it is done:
    image i+1 is read and decoded on the pool while image i is resized and normalized, and a caller can
    use image i's tiles meanwhile. Yields pixel_values [T_i, 3, S, S] (float32; uint8 if not normalize),
    or, for an image that fails, its ImageError naming it (names[i], else i), and goes on with the next.

    max_num: one for every image, or a sequence with one per image. max_pixels as in load_images.
    """
    images = list(images)
    max_nums = list(max_num) if isinstance(max_num, (list, tuple)) else [max_num] * len(images)
    if len(max_nums) != len(images):
        raise ValueError(f"max_num has {len(max_nums)} entries for {len(images)} images")
    for m in set(max_nums):
        _check_params(input_size, m, min_num)
    names = names or range(len(images))
    tiling = dict(input_size=input_size, use_thumbnail=use_thumbnail, min_num=min_num, normalize=normalize, max_pixels=max_pixels)
    jobs = [partial(_load_alone, name, image, max_num=m, **tiling) for name, image, m in zip(names, images, max_nums)]
    for result in _overlapped(jobs, ahead=_WORKERS + 1):
        if isinstance(result, TypeError):  # not an image at all: the caller's mistake
            raise result
        yield result


def _load_alone(name, image, input_size, max_num, use_thumbnail, min_num, normalize, max_pixels, overlap):
    # one image of iter_images, on the pool -> [T, 3, S, S]; its errors name it
    with ExitStack() as stack:
        (im,) = _open_all(stack, [image], [name])
        ((cols, rows, num_tiles),) = _grids([im], input_size, max_num, min_num, use_thumbnail, None, max_pixels, [name])
        out = np.empty((num_tiles, 3, input_size, input_size), dtype=np.float32 if normalize else np.uint8)
        try:
            _load_into(out, im, cols, rows, overlap)
        except ImageError as e:
            raise ImageError(f"image {name}: {e}") from e
    return out
