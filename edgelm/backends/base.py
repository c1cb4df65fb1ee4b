"""The backend interface: what every op table implements and what it says about itself.

A backend is an op table. Model files call only these ops (plus `to_host` where a value must
reach the host), so a new backend is a new subclass, never an edit of a model. Every op is
abstract: a backend that lacks one cannot be constructed, rather than silently falling back
to another backend's implementation.

Capabilities a backend declares:
- `name`: what `Engine(backend=...)` and the stats lines call it;
- `default_kv_dtype`: the KV-cache storage it prefers ("f16" or "f32");
- `fused_plans`: names of whole-model execution plans it offers (e.g. "gemma3_blocks", all
  of a Gemma 3 forward's blocks in one native call). A plan must equal the per-op path
  bitwise; a caller that has to see every op (the importance recorder) hides them.
"""

from __future__ import annotations

import abc

import numpy as np

# The ops every backend implements, with the reference semantics of backends/numpy_ops.py.
OPS = (
    "matmul",  # x [n, cols], QTensor [rows, cols] -> [n, rows]
    "matmul_multi",  # several products of one input (q, k, v)
    "matmul_gelu_mul",  # gelu(x @ G.T) * (x @ U.T)
    "embed",  # ids [n] -> rows [n, cols]
    "rmsnorm",
    "add_rmsnorm",  # residual add + norm, fused with the next norm
    "rmsnorm_rope",
    "rope",
    "gelu_mul",
    "attention",
    "softcap",
)


class Backend(abc.ABC):
    name: str = "?"
    default_kv_dtype: str = "f32"
    fused_plans: frozenset[str] = frozenset()

    def set_threads(self, n: int) -> None:
        """Worker threads for the kernels; backends without their own pool ignore it."""

    def to_host(self, x) -> np.ndarray:
        """A host (numpy) array of `x`; a no-op for host backends."""
        return np.asarray(x)

    def alloc_cache(self, spec, dtype: str):
        """A KV cache for `spec` (backends/kvcache.CacheSpec) storing `dtype` ("float16" or
        "float32"). Host backends share the lazily mapped host cache."""
        from .kvcache import KVCache

        return KVCache.from_spec(spec, dtype)

    @abc.abstractmethod
    def matmul(self, x, t): ...

    @abc.abstractmethod
    def matmul_multi(self, x, ts): ...

    @abc.abstractmethod
    def matmul_gelu_mul(self, x, gate, up): ...

    @abc.abstractmethod
    def embed(self, ids, t): ...

    @abc.abstractmethod
    def rmsnorm(self, x, w, eps): ...

    @abc.abstractmethod
    def add_rmsnorm(self, x, h, w_post, eps, w_next=None): ...

    @abc.abstractmethod
    def rmsnorm_rope(self, x, w, eps, positions, theta, scale=1.0): ...

    @abc.abstractmethod
    def rope(self, x, positions, theta, scale=1.0): ...

    @abc.abstractmethod
    def gelu_mul(self, g, u): ...

    @abc.abstractmethod
    def attention(self, q, k, v, q_pos, k_pos, window, scale, softcap=None): ...

    @abc.abstractmethod
    def softcap(self, x, cap): ...
