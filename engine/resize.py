"""Pillow's bicubic resize on several threads, byte-identical to one `im.resize(size, BICUBIC)` call.

Why the split below is exact (Pillow's src/libImaging/Resample.c, ImagingResampleInner, and
src/_imaging.c, _resize; PIL/Image.py, Image.resize):
- A resize is two separable passes, horizontal first into an 8-bit intermediate, then vertical.
  `precompute_coeffs(in_size, box0, box1, out_size)` gives each output pixel its source window
  (bounds) and integer weights; they depend only on the sizes and the box, never on pixel values.
- Horizontal pass: each intermediate row is made from the same source row alone, rounded and clipped
  to 8 bits (clip8). Resizing a crop of rows (0, y0, W, y1) to (w, y1 - y0) runs that same pass with
  the same coefficients (box (0, 0, W, y1 - y0): same in0, in1, in_size, out_size) and skips the
  vertical pass (`need_vertical` is false: same height, box[1] == 0, box[3] == ysize): it yields
  exactly those rows of the intermediate. ImagingResampleInner only keeps the rows
  [ybox_first, ybox_last) the vertical pass reads; for bicubic both clamp to [0, H), all rows.
- Vertical pass: each output column reads the same column of the intermediate alone. Resizing a
  crop of columns (x0, 0, x1, H) of the full intermediate to (x1 - x0, h) skips the horizontal pass
  (same width, box (0, 0, x1 - x0, H)) and runs the vertical one with the whole image's vertical
  coefficients (they depend on H and h only): exactly those output columns.
- A pass the whole-image call skips (w == W or h == H) is skipped here too, and when both sizes are
  equal Image.resize returns a copy.
- The order of the passes: Pillow 13 runs the VERTICAL pass first in some resizes that reduce the
  height (python-pillow/Pillow#9549 "If height is scaled down significantly more than width, resize
  vertically first", merged after the snapshot read here, commit 4e5f09f of 2026-08-22, whose
  ImagingResampleInner is always horizontal-then-vertical). Both orders round to 8 bits in between,
  so their results differ: most likely an earlier probe's 2 failing size cases of 16 (e.g.
  20x1529 -> 1186x1106: 30% of the pixels off, by up to 21). Its rule is not in the source read and
  no simple size or cost formula fits what Pillow 13 does, so we split only where it cannot apply:
  the height is not reduced (h >= H: over 6,000 random size pairs Pillow 13 never went vertical-first
  there, and 2,700 more up to 2,600 px came out byte-identical split), or one pass only runs
  (w == W or h == H). Everything else, e.g. 1920x1080 -> 1792x896, is one Pillow call.
What is NOT exact, and never done: cutting the *output* into row bands, each resized with
`box=(0, y0 * H / h, W, y1 * H / h)`: the box (float32) moves every window's centre
(in0 + (i + 0.5) * scale) and the band's scale (in1 - in0) / out_size, so some weights, after their
integer rounding, differ from the whole image's (off by 1-2 levels here; not exact either way).
Modes other than the ones below are left to Pillow (RGBA/LA go through premultiplied RGBa/La and
back, P and 1 are resized NEAREST, I;16/I/F use other kernels): the single call, same result.
"""

from functools import partial

from PIL import Image

EXACT_MODES = ("RGB", "L")  # plain 8-bit: Image.resize hands them straight to ImagingResample


def splits(n, parts):
    # -> [(start, stop)]: range(n) cut into at most `parts` nearly equal non-empty pieces
    parts = max(1, min(parts, n))
    cuts = [n * i // parts for i in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def run_all(pool, jobs):
    # jobs: zero-argument callables -> their results in order. The caller runs the first and the pool
    # the others; a job still queued behind other work when the caller is free is run here instead.
    futures = [pool.submit(job) for job in jobs[1:]]
    results = [jobs[0]()]
    for job, future in zip(jobs[1:], futures):
        results.append(job() if future.cancel() else future.result())
    return results


def can_split(im, size):
    # Exactly Pillow's own result (see the module docstring); otherwise call im.resize.
    (src_w, src_h), (w, h) = im.size, tuple(size)
    return im.mode in EXACT_MODES and (h >= src_h or w == src_w)


def worth_splitting(im, size, min_pixels=0):
    # Exact, and not a plain copy (quicker in one piece), and an intermediate of min_pixels or more
    return can_split(im, size) and tuple(size) != im.size and size[0] * im.height >= min_pixels


def resize_strips(im, size, pool, column_cuts, consume=None):
    """im.resize(size, BICUBIC) computed on the pool, as vertical strips of the output.

    column_cuts: [(x0, x1)] covering range(size[0]) in order; each strip is made (and handed to
    consume(x0, strip), run on the same thread) in parallel. -> [strip or consume's result]
    """
    if not can_split(im, size):
        raise ValueError(f"{im.mode} {im.size} -> {tuple(size)} is not split exactly; use im.resize")
    (src_w, src_h), (w, h) = im.size, tuple(size)
    consume = consume or (lambda x0, strip: strip)
    if (w, h) == (src_w, src_h):
        return run_all(pool, [partial(_copy_strip, im, x0, x1, consume) for x0, x1 in column_cuts])
    if w != src_w:  # horizontal pass, by row bands, into the intermediate (w x src_h)
        intermediate = Image.new(im.mode, (w, src_h), None)  # not cleared: every row is written
        run_all(pool, [partial(_horizontal_band, im, intermediate, y0, y1) for y0, y1 in splits(src_h, len(column_cuts))])
    else:
        intermediate = im
    return run_all(pool, [partial(_vertical_strip, intermediate, h, x0, x1, consume) for x0, x1 in column_cuts])


def resize(im, size, pool, parts=2, min_pixels=0):
    """im.resize(size, BICUBIC), byte for byte, on `parts` threads; one call where can_split says no
    or the intermediate has fewer than min_pixels (threads cost more than they save)."""
    if not worth_splitting(im, size, min_pixels):
        return im.resize(size, Image.Resampling.BICUBIC)
    strips = resize_strips(im, size, pool, splits(size[0], parts))
    if len(strips) == 1:
        return strips[0]
    out = Image.new(im.mode, tuple(size), None)  # not cleared: the strips cover it
    x0 = 0
    for strip in strips:
        out.paste(strip, (x0, 0))
        x0 += strip.width
    return out


def _copy_strip(im, x0, x1, consume):
    return consume(x0, im.crop((x0, 0, x1, im.height)))


def _horizontal_band(im, intermediate, y0, y1):
    band = im.crop((0, y0, im.width, y1)).resize((intermediate.width, y1 - y0), Image.Resampling.BICUBIC)
    intermediate.paste(band, (0, y0))


def _vertical_strip(intermediate, h, x0, x1, consume):
    strip = intermediate.crop((x0, 0, x1, intermediate.height))
    if h != intermediate.height:
        strip = strip.resize((x1 - x0, h), Image.Resampling.BICUBIC)
    return consume(x0, strip)
