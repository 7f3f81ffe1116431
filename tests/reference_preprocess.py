"""Port of the InternVL model card's `load_image` (the seed reference), for tests.

Kept deliberately literal: the same candidate-grid expression (ties depend on set iteration order),
the same PIL calls, and torchvision's ToTensor + Normalize emulated with torch, one tile at a time.
torchvision's Resize((S, S), BICUBIC) is PIL's `resize`, which returns a copy for an S x S tile.
"""

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def transform(img, input_size):
    # PIL image -> [3, S, S] float32
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((input_size, input_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().float().div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def choose_grid(orig_width, orig_height, min_num=1, max_num=12, image_size=448):
    # -> (cols, rows)
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    # -> list of S x S PIL tiles (grid row-major, then the thumbnail)
    orig_width, orig_height = image.size
    cols, rows = choose_grid(orig_width, orig_height, min_num, max_num, image_size)
    resized_img = image.resize((image_size * cols, image_size * rows))
    processed_images = []
    for i in range(cols * rows):
        box = (
            (i % cols) * image_size,
            (i // cols) * image_size,
            ((i % cols) + 1) * image_size,
            ((i // cols) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images


def load_image(image_file, input_size=448, max_num=12, use_thumbnail=True, min_num=1):
    # image_file: path or file object, or a PIL image -> pixel_values: [T, 3, S, S] float32 (torch)
    if isinstance(image_file, Image.Image):
        image = image_file.convert("RGB")
    else:
        image = Image.open(image_file).convert("RGB")
    tiles = dynamic_preprocess(
        image, min_num=min_num, max_num=max_num, image_size=input_size, use_thumbnail=use_thumbnail
    )
    return torch.stack([transform(tile, input_size) for tile in tiles])
