"""Synthetic scenes and their questions: what the shapes demo model (build/train_demo.py) learns and is tested on.

A scene is 1–3 coloured shapes (circle, square, triangle, star) at random positions and sizes on a
plain, gradient or noisy background, at sizes from 224×224 to 1920×1080 and extreme aspect ratios, so
multi-tile images and the thumbnail matter. Every question has one right answer, written as a short
sentence; `parse_shapes` / `answer_matches` read answers back so accuracy does not depend on word order.
Everything is drawn from a seeded numpy Generator: the same seed gives the same scenes and questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
NUMBERS = ("Zero", "One", "Two", "Three")
# Backgrounds are muted mid-tones, apart from every shape colour (black and white included).
BACKGROUNDS = ((128, 128, 128), (112, 122, 136), (140, 128, 112), (118, 136, 122), (136, 116, 128))
SIZES = ((224, 224), (448, 448), (640, 480), (800, 600), (1024, 768), (1280, 720), (1920, 1080), (1080, 1920), (1600, 400), (400, 1600), (1920, 320))

DESCRIBE = ("Describe the image.", "What is in the image?", "Describe this picture.", "What do you see in the image?")
SHAPE_QUESTIONS = ("What shape is in the image?", "Which shape is shown?", "What shape do you see?")
COLOR_QUESTIONS = ("What color is the {shape}?", "Which color does the {shape} have?", "What is the color of the {shape}?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes.")
WHICH_QUESTIONS = ("Which image has {a} {color} {shape}?", "In which image is there {a} {color} {shape}?")
WHICH_PREFIX = "Image-1: <image>\nImage-2: <image>\n"  # the image tags of a two-image question
QUESTION_TYPES = ("describe", "shape", "color", "count", "which")


@dataclass(frozen=True)
class Item:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    rotation: float = 0.0  # a star's turn, radians


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    items: tuple[Item, ...]

    def has(self, color: str, shape: str) -> bool:
        return any(i.color == color and i.shape == shape for i in self.items)


@dataclass(frozen=True)
class Sample:
    kind: str  # one of QUESTION_TYPES
    scenes: tuple[Scene, ...]  # one, or two for "which"
    question: str  # with "<image>" placeholders only for two-image questions
    answer: str


# Gaussian noise drawn by table lookup: 256 equally likely levels (normal quantiles, σ = 18), as fast
# as drawing bytes — a 1920×1080 noisy background is drawn for every few training questions.
_NOISE = np.round(18.0 * np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)])).astype(np.int16)


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    # -> [H, W, 3] uint8
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(base, (height, width, 3)).astype(np.uint8)
    if kind == 1:
        other = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float32) + rng.uniform(-20, 20, 3)
        angle = rng.uniform(0, 2 * np.pi)
        xs = np.arange(width, dtype=np.float32) / width * np.cos(angle)
        ys = np.arange(height, dtype=np.float32) / height * np.sin(angle)
        t = ys[:, None] + xs[None, :]
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        return (base * (1 - t[..., None]) + other * t[..., None]).clip(0, 255).astype(np.uint8)
    noise = _NOISE[rng.integers(0, 256, (height, width, 3), dtype=np.uint8)]  # [H, W, 3] int16, σ ≈ 18
    return (base.astype(np.int16) + noise).clip(0, 255).astype(np.uint8)


def _star(box: tuple[int, int, int, int], rotation: float) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    angles = rotation + np.arange(10) * np.pi / 5 - np.pi / 2
    radii = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))


def draw_mask(draw: ImageDraw.ImageDraw, item: Item, sx: float = 1.0, sy: float = 1.0, fill=255) -> None:
    """Draws the item's shape, its coordinates scaled by (sx, sy): the scene itself (scale 1, its colour)
    or a mask in another geometry (build/dense_labels.py)."""
    x0, y0, x1, y1 = item.box
    if item.shape == "circle":
        draw.ellipse((x0 * sx, y0 * sy, x1 * sx, y1 * sy), fill=fill)
    elif item.shape == "square":
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx, y1 * sy), fill=fill)
    else:
        points = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)] if item.shape == "triangle" else _star(item.box, item.rotation)
        draw.polygon([(x * sx, y * sy) for x, y in points], fill=fill)


def draw_scene(
    rng: np.random.Generator,
    n_shapes: int | None = None,
    size: tuple[int, int] | None = None,
    include: tuple[str, str] | None = None,
    avoid: tuple[str, str] | None = None,
) -> Scene:
    """n_shapes: 1–3 (random when None); include / avoid: a (color, shape) the scene must / must not hold."""
    width, height = size or SIZES[rng.integers(len(SIZES))]
    n_shapes = n_shapes or int(rng.integers(1, 4))
    array = _background(rng, width, height)
    image = Image.fromarray(np.ascontiguousarray(array))
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    items: list[Item] = []
    while len(items) < n_shapes:
        color, shape = include if include and not items else (list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if (color, shape) == avoid:
            continue
        side = int(short * rng.uniform(0.22, 0.45) / (1 + 0.25 * (n_shapes - 1)))
        for _ in range(100):
            x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, other.box, side // 8) for other in items):
                items.append(Item(shape, color, box, float(rng.uniform(-0.3, 0.3)) if shape == "star" else 0.0))
                break
    for item in items:
        draw_mask(draw, item, fill=COLORS[item.color])
    return Scene(image, tuple(items))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _phrase(items: tuple[Item, ...]) -> str:
    # "a red circle", "a red circle and a blue star", "a red circle, a blue star and a green square"
    parts = [f"{_article(i.color)} {i.color} {i.shape}" for i in sorted(items, key=lambda i: (SHAPES.index(i.shape), list(COLORS).index(i.color)))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def scene_questions(rng: np.random.Generator, scene: Scene) -> list[tuple[str, str, str]]:
    """Every kind of question one scene answers: [(kind, question, answer)], one phrasing each."""
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    out = [
        ("describe", pick(DESCRIBE), _sentence(_phrase(scene.items))),
        ("count", pick(COUNT_QUESTIONS), NUMBERS[len(scene.items)] + "."),
    ]
    if len(scene.items) == 1:
        out.append(("shape", pick(SHAPE_QUESTIONS), _sentence(f"a {scene.items[0].shape}")))
    for item in scene.items:
        if sum(other.shape == item.shape for other in scene.items) == 1:
            out.append(("color", pick(COLOR_QUESTIONS).format(shape=item.shape), _sentence(item.color)))
    return out


def which_questions(rng: np.random.Generator, scenes: tuple[Scene, Scene]) -> list[tuple[str, str, str]]:
    """"Which image has …?" for every color+shape in exactly one of two scenes."""
    pairs = {(i.color, i.shape) for scene in scenes for i in scene.items}
    out = []
    for color, shape in sorted(pairs):
        holders = [k for k, scene in enumerate(scenes) if scene.has(color, shape)]
        if len(holders) == 1:
            phrasing = WHICH_QUESTIONS[rng.integers(len(WHICH_QUESTIONS))].format(a=_article(color), color=color, shape=shape)
            out.append(("which", WHICH_PREFIX + phrasing, f"Image-{holders[0] + 1}."))
    return out


def make_sample(rng: np.random.Generator, kind: str | None = None, size: tuple[int, int] | None = None) -> Sample:
    """One question of `kind` (random when None) about freshly drawn scenes."""
    kind = kind or QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    if kind == "which":
        color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        with_it = draw_scene(rng, size=size, include=(color, shape))
        without = draw_scene(rng, size=size, avoid=(color, shape))
        scenes = (with_it, without) if rng.integers(2) == 0 else (without, with_it)
        question, answer = next((q, a) for _, q, a in which_questions(rng, scenes) if f" {color} {shape}?" in q)
        return Sample(kind, scenes, question, answer)
    while True:
        scene = draw_scene(rng, n_shapes=1 if kind == "shape" else None, size=size)
        options = [(q, a) for k, q, a in scene_questions(rng, scene) if k == kind]
        if options:
            question, answer = options[rng.integers(len(options))]
            return Sample(kind, (scene,), question, answer)


_ITEM = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def parse_shapes(text: str) -> list[tuple[str, str]]:
    """The (color, shape) pairs a describe answer names, sorted."""
    return sorted(_ITEM.findall(text.lower()))


def answer_matches(sample: Sample, reply: str) -> bool:
    """Whether a model's reply answers the sample's question (describe: the same shapes in any order)."""
    if sample.kind == "describe":
        return parse_shapes(reply) == parse_shapes(sample.answer) and bool(parse_shapes(reply))
    return reply.strip().rstrip(".").lower() == sample.answer.rstrip(".").lower()
