"""The native CPU op table: the C++ kernels (edgelm/_native) for every op the models call.

Same signatures and semantics as NumpyOps (the reference; the interface is backends/base.py); tests/test_ops.py checks each op
against it. Per-call Python work is kept small: decode calls ~18 ops per layer per token.
"""

from __future__ import annotations

import functools

import numpy as np

from ..quant.schemes import QTensor
from .base import norm_act
from .host import HostBackend

try:
    from . import native as _native

    _ERR = None if _native.available() else "the extension did not import"
except Exception as e:  # pragma: no cover - depends on the build
    _native = None
    _ERR = f"{type(e).__name__}: {e}"


def available() -> bool:
    return _native is not None and _native.available()


def unavailable_reason() -> str:
    return _ERR or ""


def _f32(a) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def _batch_mode(fn):
    """Runs a product or attention call with the op table's batch-invariant setting. The
    native setting belongs to the calling thread and is 0 outside these calls, so a
    deterministic engine and a default one (or direct kernel calls) can share a thread."""
    @functools.wraps(fn)
    def call(self, *args, **kw):
        if not self.deterministic:
            return fn(self, *args, **kw)
        self._m.set_deterministic(1)
        try:
            return fn(self, *args, **kw)
        finally:
            self._m.set_deterministic(0)
    return call


# Query rows from which attention takes the bf16 path when it is on: a prompt chunk's, not a
# decode step's (the kernel converts every K/V slot once per call, which only many rows repay).
BF16_ATTN_MIN_ROWS = 16


class CpuOps(HostBackend):
    name = "cpu"
    # fp16 K/V: half the cache's memory and bandwidth; attention widens them to fp32
    default_kv_dtype = "f16"
    fused_plans = frozenset({"gemma3_blocks"})
    supports_deterministic = True

    def __init__(self, isa: str | None = None, deterministic: bool = False):
        self._k = _native.kernels(isa) if isa else _native._default()
        self.isa = self._k.isa
        self._m = self._k.module
        # id(QTensor) -> (tensor, args): the tensor is kept so its id is never reused.
        self._wargs: dict[int, tuple] = {}
        self._rope_cache: dict = {}
        self._plans: dict[int, tuple] = {}  # id(Weights) -> (weights, native Gemma3Blocks)
        self.deterministic = bool(deterministic)

    def set_threads(self, n: int) -> None:
        self._k.set_threads(n)

    def set_attn_precision(self, precision: str) -> bool:
        # bf16: the build's vdpbf16ps path on a CPU with AVX512_BF16 (or the emulating test
        # build); never in batch-invariant mode, whose kernels must not depend on the call's rows
        self.attn_bf16 = precision == "bf16" and not self.deterministic and bool(self._m.attn_bf16_ready())
        return self.attn_bf16

    def _bf16_rows(self, n: int) -> bool:
        return self.attn_bf16 and n >= BF16_ATTN_MIN_ROWS

    def _weight_args(self, t: QTensor):
        hit = self._wargs.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        w, scale, rows, cols = _native._weight_parts(t)
        args = (t.scheme.id, w, scale, rows, cols)
        self._wargs[id(t)] = (t, args)
        return args

    @_batch_mode
    def matmul(self, x: np.ndarray, t: QTensor) -> np.ndarray:
        sid, w, scale, rows, cols = self._weight_args(t)
        x = _f32(x)
        if x.ndim != 2:
            return self._k.matmul(x, t)
        out = np.empty((x.shape[0], rows), np.float32)
        self._m.matmul(x, sid, w, scale, rows, cols, out)
        return out

    @_batch_mode
    def matmul_multi(self, x: np.ndarray, ts) -> list[np.ndarray]:
        x = _f32(x)
        args = [self._weight_args(t) for t in ts]
        if x.ndim != 2:
            return [self.matmul(x, t) for t in ts]
        outs = [np.empty((x.shape[0], a[3]), np.float32) for a in args]
        self._m.matmul_multi(x, args, outs)
        return outs

    @_batch_mode
    def matmul_gelu_mul(self, x: np.ndarray, gate: QTensor, up: QTensor) -> np.ndarray:
        x = _f32(x)
        g, u = self._weight_args(gate), self._weight_args(up)
        if x.ndim != 2:
            return self.gelu_mul(self.matmul(x, gate), self.matmul(x, up))
        out = np.empty((x.shape[0], g[3]), np.float32)
        tmp = np.empty_like(out)
        self._m.matmul_gelu_mul(x, g, u, out, tmp)
        return out

    def embed(self, ids: np.ndarray, t: QTensor) -> np.ndarray:
        return self._k.embed(np.ascontiguousarray(ids, dtype=np.int32), t)

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float, act=None) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        self._m.rmsnorm(x, _f32(w), float(eps), out, norm_act(act))
        return out

    def _rope_table(self, positions: np.ndarray, hd: int, theta: float, scale: float):
        # One forward passes the same positions to every layer (q and k): compute the
        # cos/sin table once per (positions, theta, scale, hd).
        key = (hd, float(theta), float(scale))
        hit = self._rope_cache.get(key)
        if hit is not None:
            old = hit[0]
            if old.shape == positions.shape and (
                (positions.size == 1 and old[0] == positions[0]) or np.array_equal(old, positions)
            ):
                return hit[1]
        table = self._k.rope_table(positions, hd, theta, scale)
        if len(self._rope_cache) > 8:
            self._rope_cache.clear()
        self._rope_cache[key] = (np.array(positions, copy=True), table)
        return table

    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float, scale: float = 1.0) -> np.ndarray:
        x = _f32(x)
        positions = np.asarray(positions)
        cos, sin = self._rope_table(positions, x.shape[-1], theta, scale)
        out = np.empty_like(x)
        self._m.rope(x, cos, sin, out)
        return out

    def add_rmsnorm(self, x: np.ndarray, h: np.ndarray, w_post: np.ndarray, eps: float,
                    w_next: np.ndarray | None = None):
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                and x.flags.writeable and x.ndim == 2):
            x = np.array(x, dtype=np.float32, order="C").reshape(-1, x.shape[-1])
        h = _f32(h)
        nxt = np.empty_like(x) if w_next is not None else None
        self._m.add_rmsnorm(x, h, _f32(w_post), float(eps), None if w_next is None else _f32(w_next), nxt)
        return x, nxt

    def rmsnorm_rope(self, x: np.ndarray, w: np.ndarray, eps: float, positions: np.ndarray, theta: float,
                     scale: float = 1.0) -> np.ndarray:
        x = _f32(x)
        positions = np.asarray(positions)
        cos, sin = self._rope_table(positions, x.shape[-1], theta, scale)
        out = np.empty_like(x)
        self._m.rmsnorm_rope(x, _f32(w), cos, sin, float(eps), out)
        return out

    def gelu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        g, u = _f32(g), _f32(u)
        out = np.empty_like(g)
        self._m.gelu_mul(g, u, out)
        return out

    def sigmoid_mul(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        x, g = _f32(x), _f32(g)
        out = np.empty_like(x)
        self._m.sigmoid_mul(x, g, out)
        return out

    def depthwise_conv2d(self, x, taps, stride: int, top: int, left: int, out_hw):
        return self._k.depthwise_conv2d(x, taps, stride, top, left, out_hw)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        x = _f32(x)
        out = np.empty_like(x)
        self._m.softcap(x, float(cap), out)
        return out

    @_batch_mode
    def gemma3_blocks(self, cfg, w, x: np.ndarray, h: np.ndarray, positions: np.ndarray, caches,
                      seq_rows=None, need: int | None = None) -> bool:
        """Every Gemma 3 block of one forward step in one native call (edgelm/_native/block.h):
        x [n, hidden] is updated in place and h becomes the final-norm output, exactly as the
        per-op loop of models/gemma3.forward leaves them. Returns False (nothing done) when a
        cache cannot take the step whole; the caller then runs the loop. seq_rows (batched
        decode): the rows of x of each sequence, in order; caches is then one list of layer
        caches per sequence (the products run on all rows, attention per sequence). need (one
        sequence): only the last `need` rows' outputs are wanted; the last block computes those
        rows only past its cache write, as models.gemma3._blocks does."""
        from .kvcache import KVCache

        seqs = [caches] if seq_rows is None else list(caches)
        rows = [x.shape[0]] if seq_rows is None else [int(r) for r in seq_rows]
        flat = [c for cs in seqs for c in cs]
        if len(seqs) != len(rows) or not all(
                type(c) is KVCache and c.slots >= r for cs, r in zip(seqs, rows) for c in cs):
            return False
        if len({id(c.k) for c in flat}) != len(flat):  # a cache twice: the per-op loop's semantics
            return False
        plan = self._g3_plan(cfg, w)
        hd = cfg.head_dim
        cl, sl = self._rope_table(positions, hd, cfg.rope_local_theta, 1.0)
        cg, sg = self._rope_table(positions, hd, cfg.rope_theta, cfg.rope_scaling_factor)
        filled = np.fromiter((c.filled for c in flat), np.int64, len(flat))
        plan.forward(x, h, positions, cl, sl, cg, sg, [(c.k, c.v, c.pos) for c in flat], filled,
                     seq_rows=None if seq_rows is None else rows, need=-1 if need is None else int(need),
                     attn_bf16=seq_rows is None and self._bf16_rows(x.shape[0]))
        for c, f in zip(flat, filled.tolist()):
            c.filled = f
        return True

    def _g3_plan(self, cfg, w):
        hit = self._plans.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        L = w.layers
        blocks = []
        for i, (lw, kind) in enumerate(zip(L, cfg.layer_types)):
            nxt = L[i + 1].attn_norm if i + 1 < len(L) else w.output_norm
            blocks.append((
                *(self._weight_args(t) for t in (lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down)),
                *(_f32(a) for a in (lw.q_norm, lw.k_norm, lw.post_attn_norm, lw.ffn_norm, lw.post_ffw_norm, nxt)),
                kind == "local",
            ))
        plan = self._m.Gemma3Blocks(
            blocks, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.sliding_window, cfg.rms_norm_eps, cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcap or 0.0)
        self._plans[id(w)] = (w, plan)
        return plan

    @_batch_mode
    def attention(self, q, k, v, q_pos, k_pos, window: int, scale: float, softcap: float | None = None) -> np.ndarray:
        return self._k.attention(q, k, v, q_pos, k_pos, window, scale, softcap, bf16=self._bf16_rows(len(q)))

    def full_attention(self, q, k, v, scale: float) -> np.ndarray:
        return self._k.full_attention(q, k, v, scale)
