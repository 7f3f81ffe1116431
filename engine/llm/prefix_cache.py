"""Prefix reuse: the K/V of prompt prefixes computed before, kept in blocks, copied into a new
sequence's cache at admission so that its prefill starts after them.

Keys. A prompt is cut into blocks of BLOCK_SIZE positions. A text position is identified by its token
id; a prompt-table position (fake id ≥ vocab_size) by the content key of the image its row belongs to
(engine/image_key.py: equal keys, equal features) and the row's offset within that image. The fake id
itself only numbers rows within one request, so the same image gets the same identities wherever its
rows sit in the table, and two different images never share one. Block j's hash is blake2b-256 over
block j-1's hash and the fixed-width identities of its positions: equal hashes mean equal prefixes.
Without keys (table_keys None) hashing stops at the first fake id.

Why a matching block is exact: a position's K/V depends only on the positions up to it (causal
attention; GPT-OSS's sliding windows and sinks and MoE's per-token routing included) and on nothing else
of the request, at the same absolute positions since blocks are prefixes. What can differ is float
rounding between batch shapes, the same difference chunked prefill already has.

Store. A byte-bounded pool of block-sized K/V slots, least recently used evicted first. Blocks are
copied in at admission and out after a prefill: the engine's attention reads each sequence's own
contiguous cache, so sharing pages in place would need paged attention; with copies nothing needs
reference counts, and an abort, an error or an eviction never touches K/V another sequence reads.
The copy costs one memcpy of the prefix against recomputing it. A lookup touches its blocks leaf
first, so a parent is always more recent than its children and eviction never orphans a block.
Only the engine's loop thread calls load and store.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from engine.llm.model import KVCache

BLOCK_SIZE = 16  # tokens per block: a reused prefix loses < 16 of its tokens; ~150 hashes per 2,400-token prompt
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30  # build/settings.py prefix_cache_mib serves the same default


def block_hashes(
    token_ids: torch.Tensor,  # int64 [L]; ids ≥ vocab_size index prompt-table rows
    vocab_size: int,
    table_keys: Sequence[tuple[str, int]] | None,  # (content key, rows) per image, covering the table's rows in order
    table_rows: int,
    block_size: int = BLOCK_SIZE,
) -> list[bytes]:
    """-> one chained 32-byte hash per full block, up to the first block with a row no key names."""
    ids = token_ids.numpy()
    rows = ids - vocab_size
    fake = rows >= 0
    identity = np.zeros((len(ids), 5), np.int64)  # [L, 5]: token id, or -1 - row offset; the image key's digest
    identity[:, 0] = ids
    keyed = len(ids)
    if table_keys is not None:
        starts, digests = _segments(table_keys, table_rows)
        image = np.searchsorted(starts, rows[fake], side="right") - 1
        identity[fake, 0] = -1 - (rows[fake] - starts[image])
        identity[fake, 1:] = digests[image]
    elif fake.any():
        keyed = int(fake.argmax())
    hashes, parent = [], b""
    for start in range(0, keyed - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + identity[start : start + block_size].tobytes(), digest_size=32).digest()
        hashes.append(parent)
    return hashes


def _segments(table_keys: Sequence[tuple[str, int]], table_rows: int) -> tuple[np.ndarray, np.ndarray]:
    # -> first row of each image int64 [S], sha256 of each key as int64 [S, 4]
    rows = np.array([int(n) for _, n in table_keys], np.int64)
    if (rows < 1).any():
        raise ValueError(f"table_keys must give each image ≥ 1 prompt-table row, got {rows.tolist()}")
    if int(rows.sum()) != table_rows:
        raise ValueError(f"table_keys cover {int(rows.sum())} prompt-table rows but the prompt table has {table_rows}")
    digests = b"".join(hashlib.sha256(str(key).encode()).digest() for key, _ in table_keys)
    return np.cumsum(rows) - rows, np.frombuffer(digests, np.int64).reshape(len(rows), 4)


class PrefixCache:
    def __init__(self, max_bytes: int, block_size: int = BLOCK_SIZE):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache bound must be ≥ 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.block_size = block_size
        self._slots: OrderedDict[bytes, int] = OrderedDict()  # block hash -> pool slot, least recently used first
        self._free: list[int] = []
        self.k: torch.Tensor | None = None  # [capacity, layers, kv_heads, block_size, head_dim], at the first store
        self.v: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return len(self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (allocated at the first store, never above max_bytes)."""
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def load(self, hashes: list[bytes], cache: KVCache, max_tokens: int) -> int:
        """Copies the longest cached prefix of these blocks, at most max_tokens positions, into the
        start of `cache` -> its length in tokens."""
        slots = []
        for block_hash in hashes[: max_tokens // self.block_size]:
            slot = self._slots.get(block_hash)
            if slot is None:
                break
            slots.append(slot)
        if not slots:
            return 0
        self._touch(hashes[: len(slots)])
        # one copy per block: a gathered pool[index] allocates the whole prefix once more (5× slower
        # for a 2,352-token prefix of the InternVL3.5-1B shape)
        for j, slot in enumerate(slots):
            cache.k[:, :, self._span(j)].copy_(self.k[slot])  # [layers, kv_heads, B, d]
            cache.v[:, :, self._span(j)].copy_(self.v[slot])
        return len(slots) * self.block_size

    def store(self, hashes: list[bytes], cache: KVCache) -> None:
        """Inserts the blocks of `cache` these hashes name (positions 0 .. len(hashes)·B) that are
        not cached yet, evicting the least recently used ones beyond the bound."""
        if self.k is None:
            self._allocate(cache)
        hashes = hashes[: len(self._free) + len(self._slots)]  # a chain longer than the pool keeps its head
        if not hashes:
            return
        self._touch([h for h in hashes if h in self._slots])  # a chain's cached blocks are not evicted for its new ones
        for j, block_hash in enumerate(hashes):
            if block_hash not in self._slots:
                slot = self._take_slot()
                self.k[slot].copy_(cache.k[:, :, self._span(j)])
                self.v[slot].copy_(cache.v[:, :, self._span(j)])
                self._slots[block_hash] = slot
        self._touch(hashes)

    def _span(self, block: int) -> slice:
        return slice(block * self.block_size, (block + 1) * self.block_size)

    def _touch(self, chain: list[bytes]) -> None:
        for block_hash in reversed(chain):  # leaf first: each parent ends more recent than its children
            self._slots.move_to_end(block_hash)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        return self._slots.popitem(last=False)[1]

    def _allocate(self, cache: KVCache) -> None:
        layers, kv_heads, _, head_dim = cache.k.shape
        block_bytes = 2 * layers * kv_heads * self.block_size * head_dim * cache.k.element_size()
        capacity = self.max_bytes // block_bytes
        shape = (capacity, layers, kv_heads, self.block_size, head_dim)
        # untouched pages of a large allocation are not resident: memory grows with the blocks stored
        self.k, self.v = torch.empty(shape, dtype=cache.k.dtype), torch.empty(shape, dtype=cache.v.dtype)
        self._free = list(range(capacity - 1, -1, -1))
