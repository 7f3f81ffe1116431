"""Images of one or several requests → their prompt tables, through the vision-feature cache: cached
images skip decoding, tiling and the encoder; the others, of all requests, are decoded and tiled in
one stream (engine/preprocess.py iter_images: an image decodes while the one before it resizes; a
video's missing frames are decoded together, engine/video_frames.py) and encoded together in one
run, then cached. A request whose image fails gets its error; the other
requests go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelConfig
from engine.preprocess import iter_images
from engine.video_frames import decode_frames
from engine.vision_cache import ImageFeatures, VisionCache


@dataclass(frozen=True, slots=True)
class RequestImages:
    images: list  # what engine/preprocess.py load_image takes (encoded bytes on the serving path) or a
    # video's frames (engine/video_frames.py VideoFrame), in prompt order
    keys: list[str]  # engine/image_key.py, one per image
    max_tiles: int


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    table: np.ndarray  # float32 [sum T_i·Q, H]
    tile_tokens: np.ndarray  # int32 [sum T_i]
    num_tiles: list[int]  # [T_i] per image


class ImageFeatureSource:
    def __init__(self, encoder, cache: VisionCache, config: ModelConfig):
        self.encoder, self.cache = encoder, cache
        self.tiling = dict(input_size=config.vision.image_size, min_num=config.min_num, use_thumbnail=config.use_thumbnail)
        # Flash routes over all tiles of a request: its images are encoded together or not at all
        self.per_request = config.flash is not None
        self.encoded_tiles = 0  # tiles run through the encoder (observability)

    @classmethod
    def of(cls, encoder, config: ModelConfig, cache_bytes: int) -> ImageFeatureSource:
        return cls(encoder, VisionCache(cache_bytes), config)

    def features(self, requests: list[RequestImages]) -> list[RequestFeatures | Exception]:
        found = [[self.cache.get(key) for key in r.keys] for r in requests]
        pixels: dict[int, tuple[list[int], np.ndarray, list[int]]] = {}  # request -> (missing images, tiles, counts)
        results: list[RequestFeatures | Exception | None] = [None] * len(requests)
        wanted = []  # (request, its missing images, those images with video frames decoded)
        for i, (request, hits) in enumerate(zip(requests, found)):
            missing = [j for j, hit in enumerate(hits) if hit is None]
            if not missing:
                continue
            if self.per_request:
                missing = list(range(len(hits)))
            try:
                wanted.append((i, missing, decode_frames([request.images[j] for j in missing])))
            except ValueError as error:  # VideoError: this request's video is at fault
                results[i] = error
        # Every request's images in one stream, in order: one decodes while the one before it resizes
        stream = iter_images(
            [image for _, _, images in wanted for image in images],
            max_num=[requests[i].max_tiles for i, missing, _ in wanted for _ in missing],
            normalize=False,
            names=[j for _, missing, _ in wanted for j in missing],
            **self.tiling,
        )
        for i, missing, _ in wanted:
            loaded = [next(stream) for _ in missing]
            error = next((x for x in loaded if isinstance(x, Exception)), None)
            if error is not None:  # ImageError: this request's image is at fault
                results[i] = error
                continue
            pixels[i] = (missing, np.concatenate(loaded), [len(x) for x in loaded])
        if pixels:
            # One run for every request's missing tiles; each request is routed on its own (Flash).
            encoded = self.encoder.encode_requests([tiles for _, tiles, _ in pixels.values()])
            self.encoded_tiles += sum(len(tiles) for _, tiles, _ in pixels.values())
            for (i, (missing, _, counts)), (table, tile_tokens) in zip(pixels.items(), encoded):
                rows_per_tile = len(table) // len(tile_tokens)
                starts = np.cumsum([0, *counts])
                for j, a, b in zip(missing, starts[:-1], starts[1:]):
                    features = ImageFeatures(table[a * rows_per_tile : b * rows_per_tile], tile_tokens[a:b])
                    found[i][j] = features
                    self.cache.put(requests[i].keys[j], features)
        for i, hits in enumerate(found):
            if results[i] is None:
                results[i] = _joined(hits)
        return results


def _joined(images: list[ImageFeatures]) -> RequestFeatures:
    if not images:
        return RequestFeatures(np.zeros((0, 0), np.float32), np.zeros(0, np.int32), [])
    return RequestFeatures(
        np.concatenate([f.table for f in images]), np.concatenate([f.tile_tokens for f in images]), [len(f.tile_tokens) for f in images]
    )
