"""Pillow's bicubic resize on several threads, byte-identical to one `im.resize(size, BICUBIC)` call.

Why the split below is exact (Pillow's src/libImaging/Resample.c, ImagingResampleInner, and
src/_imaging.c, _resize; PIL/Image.py, Image.resize):
- A resize is two separable passes through an 8-bit intermediate (their order: last bullet).
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
- The order of the passes: Pillow 13 runs the VERTICAL pass first when both run and the height
  shrinks by more than twice what the width shrinks, H - h > 0 and H - h > 2 * (W - w)
  (python-pillow/Pillow#9549, merged after the source snapshot read here, commit 4e5f09f of
  2026-08-22, which is always horizontal-then-vertical; the rule is read off the installed
  _imaging .so, ImagingResample's disassembly, and agrees with 5,939 random size pairs). Both orders
  round to 8 bits in between, so their results differ: an earlier probe's 2 failing size cases of 16
  (e.g. 20x1529 -> 1186x1106: 30% of the pixels off, by up to 21) were most likely this. We follow it:
  vertical first, the vertical pass runs in column strips of the source into a W x h intermediate,
  then the horizontal pass in its row bands (the same argument, transposed).
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


def vertical_first(src_size, size):
    # Pillow 13's pass order for a resize src_size -> size (see the module docstring)
    (src_w, src_h), (w, h) = src_size, size
    return w != src_w and src_h - h > 0 and src_h - h > 2 * (src_w - w)


def can_split(im):
    return im.mode in EXACT_MODES


def worth_splitting(im, size, min_pixels=0):
    # Exact, and not a plain copy (quicker in one piece), and an intermediate of min_pixels or more
    (src_w, src_h), (w, h) = im.size, tuple(size)
    return can_split(im) and (w, h) != (src_w, src_h) and max(w * src_h, src_w * h) >= min_pixels


def resize_blocks(im, size, pool, parts, consume=None):
    """im.resize(size, BICUBIC) computed on the pool in `parts` blocks of the output: column strips, or
    row bands when Pillow goes vertical-first. Each block is handed to consume(x0, y0, block) on the
    thread that made it. -> [consume's results], by default [(x0, y0, block)]
    """
    if not can_split(im):
        raise ValueError(f"mode {im.mode} is not split exactly; use im.resize")
    (src_w, src_h), (w, h) = im.size, tuple(size)
    consume = consume or (lambda x0, y0, block: (x0, y0, block))
    if vertical_first(im.size, (w, h)):  # vertical pass by source columns, horizontal by rows
        mid = Image.new(im.mode, (src_w, h), None)  # not cleared: every column is written
        run_all(pool, [partial(_into, mid, (x0, 0), im, (x0, 0, x1, src_h), (x1 - x0, h)) for x0, x1 in splits(src_w, parts)])
        return run_all(pool, [partial(_out, consume, (0, y0), mid, (0, y0, src_w, y1), (w, y1 - y0)) for y0, y1 in splits(h, parts)])
    if w != src_w:  # horizontal pass by source rows, vertical by columns
        mid = Image.new(im.mode, (w, src_h), None)  # not cleared: every row is written
        run_all(pool, [partial(_into, mid, (0, y0), im, (0, y0, src_w, y1), (w, y1 - y0)) for y0, y1 in splits(src_h, parts)])
    else:
        mid = im
    return run_all(pool, [partial(_out, consume, (x0, 0), mid, (x0, 0, x1, src_h), (x1 - x0, h)) for x0, x1 in splits(w, parts)])


def resize(im, size, pool, parts=2, min_pixels=0):
    """im.resize(size, BICUBIC), byte for byte, on `parts` threads; one call for other modes, the same
    size, or an intermediate below min_pixels (threads would cost more than they save)."""
    if not worth_splitting(im, size, min_pixels):
        return im.resize(size, Image.Resampling.BICUBIC)
    out = Image.new(im.mode, tuple(size), None)  # not cleared: the blocks cover it
    for x0, y0, block in resize_blocks(im, size, pool, parts):
        out.paste(block, (x0, y0))
    return out


def _piece(src, box, size):
    # One pass of the whole resize on the crop `box` of src (see the module docstring)
    piece = src.crop(box)
    return piece if piece.size == size else piece.resize(size, Image.Resampling.BICUBIC)


def _into(dest, xy, src, box, size):
    dest.paste(_piece(src, box, size), xy)


def _out(consume, xy, src, box, size):
    return consume(*xy, _piece(src, box, size))
