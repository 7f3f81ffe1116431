"""Projected vision features of images already seen, by content key (engine/image_key.py): a hit
skips decoding, tiling and the encoder. An LRU bounded in bytes, shared by the threads of one
process (the Pipeline's callers, or the requests one Triton vision instance batches)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class ImageFeatures:
    table: np.ndarray  # float32 [T·Q, H]: the image's prompt-table rows
    tile_tokens: np.ndarray  # int32 [T]: tokens each tile keeps (Q, or fewer for a Flash-compressed tile)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.tile_tokens.nbytes


class VisionCache:
    def __init__(self, max_bytes: int):
        """max_bytes 0: off (nothing is kept, every lookup misses)."""
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, features: ImageFeatures) -> None:
        if features.nbytes > self.max_bytes:
            return  # larger than the whole cache (or the cache is off)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = features
            self.bytes += features.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
