"""The backend interface: what every op table implements and what it says about itself.

A backend is an op table. Model files call only these ops, so a new backend is a new
subclass, never an edit of a model. Every op is abstract: a backend that lacks one cannot be
constructed, rather than silently falling back to another backend's implementation.

The array contract. A backend's arrays (activations, and the norm vectors `place_weights`
hands back) are opaque to the models, which may use only what numpy arrays and torch tensors
share: `+ - * /` between arrays of the backend (broadcasting) and with Python or numpy
scalars, unary `-`, basic indexing (ints, slices, None), `.reshape(...)` and `.shape`.
Anything else (a transcendental, a reduction, a transpose, a concatenation) is an op.
Host-side metadata stays numpy: token ids, positions, soft-row indices and values are op
arguments, and quantized weights are QTensors that the ops interpret. Results reach the host
through `to_host`; tests/test_backend_contract.py runs every model on a backend whose arrays
refuse everything else.

Capabilities a backend declares:
- `name`: what `Engine(backend=...)` and the stats lines call it;
- `default_kv_dtype`: the KV-cache storage it prefers ("f16" or "f32");
- `fused_plans`: names of whole-model execution plans it offers (e.g. "gemma3_blocks", all
  of a Gemma 3 forward's blocks in one native call). A plan must equal the per-op path
  bitwise; a caller that has to see every op (the importance recorder) hides them.
- `device_logits`: logits may stay in the backend's memory; it then has `argmax(x, n)`
  (the first index of the largest of x[:n], one integer to the host), `topk(x, k, n)` (the
  k largest of x[:n] and their ids, in id order, as host arrays) and
  `decode_step(model, cfg, weights, caches, token, pos)` (one decode step as a replayable
  static step; None where the model cannot take one).
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
    "rmsnorm",  # act="gelu": GELU (tanh approximation) of the normed rows
    "add_rmsnorm",  # residual add + norm, fused with the next norm
    "rmsnorm_rope",
    "rope",
    "gelu_mul",
    "sigmoid_mul",  # x * sigmoid(g): SiLU (g = x) and GLU gates (Gemma 3n's audio tower)
    "attention",
    "full_attention",  # every query sees every key (encoders: the image tower's attention)
    "softcap",
    # generic array ops: what a model needs beyond the operators of the array contract
    "tanh",
    "einsum",  # numpy/torch einsum spec, float32 operands
    "concat",
    "match_rms",  # x rescaled to ref's per-row RMS (Gemma 3n's AltUp streams)
    "gaussian_topk",  # relu(g - (mean + std * k)) per row (Gemma 3n's activation sparsity)
    "splice",  # x with rows replaced by host values (soft embeddings)
    "depthwise_conv2d",  # channels-last depthwise convolution (Gemma 3n's image tower)
    # placement and caches
    "place_weights",
    "alloc_cache",
    "to_host",
)


class Backend(abc.ABC):
    name: str = "?"
    default_kv_dtype: str = "f32"
    fused_plans: frozenset[str] = frozenset()
    device_logits: bool = False
    prefill_chunk: int | None = None  # the prompt chunk it prefers (None: the engine's default)

    # Batch invariance (docs/kernels.md): whether a row's results can be made independent of
    # the other rows of a call, the chunking of a prompt and the cache's history.
    supports_deterministic: bool = False
    deterministic: bool = False

    # Prefill attention in bf16 dot products (docs/kernels.md, "bf16 prefill attention"): only
    # where the backend has such a kernel; set_attn_precision says whether it took effect.
    attn_bf16: bool = False

    def set_threads(self, n: int) -> None:
        """Worker threads for the kernels; backends without their own pool ignore it."""

    def set_deterministic(self, on: bool) -> None:
        """Batch-invariant kernels on or off (set before the engine is built)."""
        if on and not self.supports_deterministic:
            from ..errors import BadInputError

            raise BadInputError(f"the {self.name} backend has no batch-invariant (deterministic) mode; use the "
                                f"cpu backend")
        self.deterministic = bool(on)

    def set_attn_precision(self, precision: str) -> bool:
        """"f32" (default) or "bf16": the precision of prefill attention's dot products.
        Returns whether bf16 is in effect; backends without a bf16 kernel keep f32."""
        self.attn_bf16 = False
        return False

    @abc.abstractmethod
    def place_weights(self, weights):
        """The model's Weights (a frozen dataclass tree of QTensors and fp32 norm vectors)
        ready for this backend's ops: host backends use the mmap views as they are."""

    @abc.abstractmethod
    def alloc_cache(self, spec, dtype: str):
        """A KV cache for `spec` (backends/kvcache.CacheSpec) storing `dtype` ("float16" or
        "float32"), with the interface of backends/kvcache.KVCache (update, truncate,
        can_truncate, copy, nbytes)."""

    @abc.abstractmethod
    def to_host(self, x) -> np.ndarray:
        """A host (numpy) array of one of this backend's arrays."""

    @abc.abstractmethod
    def matmul(self, x, t): ...

    @abc.abstractmethod
    def matmul_multi(self, x, ts): ...

    @abc.abstractmethod
    def matmul_gelu_mul(self, x, gate, up): ...

    @abc.abstractmethod
    def embed(self, ids, t): ...

    @abc.abstractmethod
    def rmsnorm(self, x, w, eps, act=None):
        """x / sqrt(mean(x^2, -1) + eps) * w; act="gelu" then applies tanh-approximated GELU."""

    @abc.abstractmethod
    def add_rmsnorm(self, x, h, w_post, eps, w_next=None): ...

    @abc.abstractmethod
    def rmsnorm_rope(self, x, w, eps, positions, theta, scale=1.0): ...

    @abc.abstractmethod
    def rope(self, x, positions, theta, scale=1.0): ...

    @abc.abstractmethod
    def gelu_mul(self, g, u): ...

    @abc.abstractmethod
    def sigmoid_mul(self, x, g):
        """x * sigmoid(g), same shapes."""

    @abc.abstractmethod
    def attention(self, q, k, v, q_pos, k_pos, window, scale, softcap=None): ...

    @abc.abstractmethod
    def full_attention(self, q, k, v, scale):
        """q [n, H, hd], k/v [T, KV, hd] -> [n, H * hd]: softmax(q.k * scale) . v over all T
        keys for every query (no positions, window or cap)."""

    @abc.abstractmethod
    def softcap(self, x, cap): ...

    @abc.abstractmethod
    def tanh(self, x): ...

    @abc.abstractmethod
    def einsum(self, spec: str, *xs): ...

    @abc.abstractmethod
    def concat(self, xs, axis: int = 0): ...

    @abc.abstractmethod
    def match_rms(self, x, ref, floor: float = 1e-5):
        """x * rms(ref) / sqrt(max(mean(x^2), floor)), per row (last axis); ref broadcasts."""

    @abc.abstractmethod
    def gaussian_topk(self, g, k: float):
        """max(g - (mean(g) + std(g) * k), 0) per row (population std)."""

    @abc.abstractmethod
    def depthwise_conv2d(self, x, taps, stride: int, top: int, left: int, out_hw):
        """x [H, W, C], taps [k, k, C] -> [oh, ow, C] = out_hw + (C,): out[o, p, c] is the sum over
        taps (i, j) of x[stride*o + i - top, stride*p + j - left, c] * taps[i, j, c], taps that
        fall outside x reading zero (the padding)."""

    @abc.abstractmethod
    def splice(self, x, rows, values):
        """x [n, d] with rows `rows` (host int64 [m]) replaced by `values` (host float32
        [m, d]); x is a fresh array the caller owns, so it may be written in place."""


NORM_ACTS = {None: 0, "gelu": 1}  # rmsnorm's act -> the native kernels' code


def norm_act(act) -> int:
    """rmsnorm's `act` as the native code, or a ValueError naming it."""
    try:
        return NORM_ACTS[act]
    except (KeyError, TypeError):
        raise ValueError(f"rmsnorm: act must be one of {sorted(map(str, NORM_ACTS))}, got {act!r}") from None


def full_attention_by_positions(ops: Backend, q, k, v, scale):
    """full_attention through a backend's masked `attention`: every query and key at position
    0, no window, so every query sees every key."""
    zq, zk = np.zeros(q.shape[0], np.int64), np.zeros(k.shape[0], np.int64)
    return ops.attention(q, k, v, zq, zk, 0, scale, None)
