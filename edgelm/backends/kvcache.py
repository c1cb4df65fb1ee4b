"""Per-layer KV caches: what a model declares (CacheSpec) and the host implementation.

A model says which caches it needs (`cache_specs(cfg, capacity, max_chunk)`: one CacheSpec
per layer that stores K/V, global or sliding-window); the backend allocates them
(`Backend.alloc_cache(spec, dtype)`). Host backends use KVCache below; a device backend
allocates its own kind behind the same interface (update, truncate, can_truncate, copy,
nbytes).

`update(k, v, positions) -> (K, V, K_pos)` stores a chunk and returns the keys/values that
the chunk's queries may need, with their positions for masking (-1 = empty slot).
Only filled slots are returned, so work never depends on unused capacity.

Global layers keep every position up to the capacity chosen at load time. Sliding-window
layers keep a ring buffer of `window - 1 + max_chunk` slots: enough that a whole chunk
can be written before it attends, without overwriting a key an earlier query in the same
chunk still sees.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CacheSpec:
    """One layer's K/V store: `slots` positions of [kv_heads, head_dim]; `window` is the
    layer's sliding window (None for a global layer), whose ring may then hold fewer slots
    than the capacity."""

    slots: int
    kv_heads: int
    head_dim: int
    window: int | None = None


def sliding_slots(capacity: int, window: int, max_chunk: int) -> int:
    """Ring slots of a sliding-window layer: a whole chunk is written before it attends, so
    window - 1 earlier positions plus the chunk must fit."""
    return min(capacity, window - 1 + max_chunk)


def _lazy_zeros(shape, dtype) -> np.ndarray:
    """A zero array whose pages become resident only when written, and are returned to the
    OS when the array goes: an anonymous mapping of its own. (np.zeros gives the same only
    while malloc serves the request with mmap; once glibc's dynamic threshold has grown past
    the size, calloc hands out heap memory, zeroing and so touching every page.)"""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes < (1 << 16):
        return np.zeros(shape, dt)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dt).reshape(shape)


class SlotPositions:
    """The position each slot holds (`pos`, -1 = empty; `filled`: slots [0, filled) used) and
    what a rewind may do with them, shared by the host cache and a device cache's host mirror."""

    pos: np.ndarray
    slots: int
    filled: int
    window: int | None

    def _forget(self, n_tokens: int) -> None:
        """Mark every position >= n_tokens empty and recount `filled`."""
        self.pos[self.pos >= n_tokens] = -1
        used = np.nonzero(self.pos >= 0)[0]
        self.filled = int(used[-1]) + 1 if used.size else 0

    def can_truncate(self, n_tokens: int) -> bool:
        """Whether truncate(n_tokens) leaves a cache that is valid for continuing at position
        n_tokens. Always true for a global layer (nothing is ever overwritten). A ring buffer
        may already have overwritten positions the next queries still attend to: it must
        still hold every position in [n_tokens - (window - 1), n_tokens) (the whole ring's
        worth when the window is unknown)."""
        if n_tokens <= 0:
            return True
        need = self.slots if self.window is None else min(self.window - 1, self.slots)
        lo = max(0, n_tokens - need)
        if lo >= n_tokens:
            return True
        held = self.pos[(self.pos >= lo) & (self.pos < n_tokens)]
        return int(np.unique(held).size) == n_tokens - lo


class KVCache(SlotPositions):
    @classmethod
    def from_spec(cls, spec: CacheSpec, dtype="float32") -> "KVCache":
        c = cls(spec.slots, spec.kv_heads, spec.head_dim, dtype)
        c.window = spec.window
        return c

    def __init__(self, slots: int, kv_heads: int, head_dim: int, dtype="float32"):
        # dtype float16 halves the cache (writes round to nearest); attention widens it again.
        self.slots = slots
        # untouched pages stay unmapped, so resident memory grows with use, not capacity
        self.k = _lazy_zeros((slots, kv_heads, head_dim), dtype)  # [slots, KV, hd]
        self.v = _lazy_zeros((slots, kv_heads, head_dim), dtype)
        self.pos = np.full(slots, -1, dtype=np.int64)  # position held by each slot
        self.filled = 0  # slots [0, filled) hold data
        # Sliding window of the layer (None = global). It only sharpens can_truncate(): a
        # ring must still hold the window - 1 positions before the rewind point.
        self.window: int | None = None

    def update(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray):
        n = k.shape[0]
        if n == 1:  # decode: one slot, plain indexing (no fancy-index machinery)
            p = int(positions[0])
            i = p % self.slots
            self.k[i] = k[0]
            self.v[i] = v[0]
            self.pos[i] = p
            if i >= self.filled:
                self.filled = i + 1
            f = self.filled
            return self.k[:f], self.v[:f], self.pos[:f]
        if n > self.slots:  # only the newest `slots` entries can be kept
            k, v, positions = k[-self.slots:], v[-self.slots:], positions[-self.slots:]
            n = self.slots
        idx = positions % self.slots
        self.k[idx] = k
        self.v[idx] = v
        self.pos[idx] = positions
        self.filled = max(self.filled, int(idx.max()) + 1)
        f = self.filled
        return self.k[:f], self.v[:f], self.pos[:f]

    def truncate(self, n_tokens: int) -> None:
        """Forget every position >= n_tokens (used by reset and rewinds)."""
        self._forget(n_tokens)

    def copy(self) -> "KVCache":
        """An independent copy (only the filled slots are copied; the rest stays lazy)."""
        c = KVCache.__new__(KVCache)
        c.slots, c.filled, c.window = self.slots, self.filled, self.window
        c.k = _lazy_zeros(self.k.shape, self.k.dtype)
        c.v = _lazy_zeros(self.v.shape, self.v.dtype)
        f = self.filled
        c.k[:f] = self.k[:f]
        c.v[:f] = self.v[:f]
        c.pos = self.pos.copy()
        return c

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    @property
    def resident_nbytes(self) -> int:
        """The memory its filled slots take, in whole pages (pages past them stay unmapped
        until written), and the slot positions."""
        page = mmap.PAGESIZE
        used = -(-self.k.nbytes * self.filled // max(self.slots, 1) // page) * page
        return int(2 * used + self.pos.nbytes)
