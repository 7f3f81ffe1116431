"""build.scenes: the drawn pixels hold the shapes the answers name, and every answer follows from the scene."""

from __future__ import annotations

import numpy as np
import pytest

from build import scenes
from build.scenes import COLORS, QUESTION_TYPES, answer_matches, draw_scene, make_sample, parse_shapes


def _centre_colour(scene, item) -> tuple[int, int, int]:
    x0, y0, x1, y1 = item.box
    # a star's and a triangle's centroid lie inside them; probe a little below the box centre for the triangle
    cy = (y0 + 2 * y1) // 3 if item.shape == "triangle" else (y0 + y1) // 2
    return tuple(int(v) for v in np.asarray(scene.image)[cy, (x0 + x1) // 2])


@pytest.mark.parametrize("seed", range(5))
def test_pixels_show_each_item_in_its_colour_and_items_do_not_overlap(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        scene = draw_scene(rng)
        assert scene.image.size in scenes.SIZES and scene.image.mode == "RGB"
        assert 1 <= len(scene.items) <= 3
        for i, item in enumerate(scene.items):
            assert _centre_colour(scene, item) == COLORS[item.color], item
            for other in scene.items[i + 1 :]:
                a, b = item.box, other.box
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_same_seed_same_samples_other_seed_other_samples():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [make_sample(rng) for _ in range(6)]

    a, b, c = draw(1), draw(1), draw(2)
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for s, t in zip(a, b) for x, y in zip(s.scenes, t.scenes))
    assert [(s.question, s.answer) for s in a] != [(s.question, s.answer) for s in c]


@pytest.mark.parametrize("kind", QUESTION_TYPES)
def test_each_answer_follows_from_the_scene(kind):
    rng = np.random.default_rng(7)
    for _ in range(20):
        sample = make_sample(rng, kind)
        items = sample.scenes[0].items
        if kind == "describe":
            assert parse_shapes(sample.answer) == sorted((i.color, i.shape) for i in items)
        elif kind == "count":
            assert sample.answer == ("One.", "Two.", "Three.")[len(items) - 1]
        elif kind == "shape":
            assert len(items) == 1 and sample.answer == f"A {items[0].shape}."
        elif kind == "color":
            asked = next(s for s in scenes.SHAPES if f"the {s}" in sample.question)
            (item,) = [i for i in items if i.shape == asked]  # asked only about a shape the scene holds once
            assert sample.answer == item.color.capitalize() + "."
        else:
            color, shape = sample.question.rstrip("?").split()[-2:]
            holders = [k for k, scene in enumerate(sample.scenes) if scene.has(color, shape)]
            assert len(sample.scenes) == 2 and sample.question.count("<image>") == 2
            assert holders == [int(sample.answer[len("Image-")]) - 1]


def test_answer_matching_reads_the_shapes_in_any_order():
    rng = np.random.default_rng(3)
    sample = next(s for s in (make_sample(rng, "describe") for _ in range(50)) if len(s.scenes[0].items) >= 2)
    parts = sample.answer.rstrip(".").replace(" and ", ", ").split(", ")
    assert answer_matches(sample, " and ".join(reversed(parts)) + ".")
    assert not answer_matches(sample, parts[0] + ".")
    count = make_sample(rng, "count")
    assert answer_matches(count, count.answer.lower()) and not answer_matches(count, "Four.")
