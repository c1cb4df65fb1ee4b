"""What every host (numpy-array) backend shares: placement, the host KV cache, `to_host`, and
the generic array ops. Both concrete host backends derive from it; none derives from another
backend, so an op a backend lacks is still an error (backends/base.py)."""

from __future__ import annotations

import numpy as np

from .base import Backend


class HostBackend(Backend):
    def place_weights(self, weights):
        return weights  # the mmap views and fp32 norms are used in place: nothing is copied

    def alloc_cache(self, spec, dtype: str):
        from .kvcache import KVCache

        return KVCache.from_spec(spec, dtype)

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x)

    def tanh(self, x):
        return np.tanh(x)

    def einsum(self, spec: str, *xs):
        return np.einsum(spec, *xs).astype(np.float32, copy=False)

    def concat(self, xs, axis: int = 0):
        return np.concatenate(xs, axis=axis)

    def match_rms(self, x, ref, floor: float = 1e-5):
        target = np.sqrt(np.mean(ref * ref, axis=-1, keepdims=True, dtype=np.float32))
        have = np.sqrt(np.maximum(np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32), np.float32(floor)))
        return x * (target / have)

    def gaussian_topk(self, g, k: float):
        cutoff = g.mean(axis=-1, keepdims=True) + g.std(axis=-1, keepdims=True) * np.float32(k)
        return np.maximum(g - cutoff, np.float32(0.0))

    def splice(self, x, rows, values):
        x[rows] = values
        return x
