"""The numpy reference op table. Obviously-correct fp32 math; every other backend is
tested against it. Model files call only these ops and never branch on the device."""

from __future__ import annotations

import numpy as np

from ..quant.schemes import QTensor
from .base import full_attention_by_positions, norm_act
from .host import HostBackend

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


class NumpyOps(HostBackend):
    name = "numpy"
    default_kv_dtype = "f32"

    def __init__(self):
        # Dequantized copies of quantized weights, made on first use. Only the reference
        # backend does this; fp32 weights are used straight from the mmap.
        self._deq: dict[int, np.ndarray] = {}

    def set_threads(self, n: int) -> None:  # numpy/BLAS manage their own threads
        pass

    def _weight(self, t: QTensor) -> np.ndarray:
        if t.scheme.name == "fp32":
            return t.parts["w"].reshape(t.rows, t.cols)
        key = id(t.parts.get("q", t.parts.get("w")))
        w = self._deq.get(key)
        if w is None:
            w = self._deq[key] = t.dequantize().reshape(t.rows, t.cols)
        return w

    # x [n, cols] -> [n, rows]
    def matmul(self, x: np.ndarray, t: QTensor) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32) @ self._weight(t).T

    # several products of one input: x [n, cols] -> [[n, rows_j] for each weight] (q, k, v)
    def matmul_multi(self, x: np.ndarray, ts) -> list[np.ndarray]:
        return [self.matmul(x, t) for t in ts]

    # GeGLU of two products of one input: gelu(x @ G.T) * (x @ U.T)
    def matmul_gelu_mul(self, x: np.ndarray, gate: QTensor, up: QTensor) -> np.ndarray:
        return self.gelu_mul(self.matmul(x, gate), self.matmul(x, up))

    # ids [n] -> [n, cols]
    def embed(self, ids: np.ndarray, t: QTensor) -> np.ndarray:
        return t.dequantize_rows(ids).astype(np.float32, copy=False)

    # x [..., d], w [d] (already 1+w) -> [..., d]
    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float, act=None) -> np.ndarray:
        gelu = norm_act(act) == 1
        x = x.astype(np.float32, copy=False)
        ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
        y = x * (1.0 / np.sqrt(ms + np.float32(eps))) * w
        return self.gelu_mul(y, np.float32(1.0)) if gelu else y

    # The residual step: x + rmsnorm(h) * w_post, and (w_next given) rmsnorm of that sum,
    # the next block's input. Returns (x_new, next or None). CpuOps updates x in place.
    def add_rmsnorm(self, x: np.ndarray, h: np.ndarray, w_post: np.ndarray, eps: float,
                    w_next: np.ndarray | None = None):
        x = x + self.rmsnorm(h, w_post, eps)
        return x, (self.rmsnorm(x, w_next, eps) if w_next is not None else None)

    # Gemma's per-head q/k norm followed by RoPE.
    def rmsnorm_rope(self, x: np.ndarray, w: np.ndarray, eps: float, positions: np.ndarray, theta: float,
                     scale: float = 1.0) -> np.ndarray:
        return self.rope(self.rmsnorm(x, w, eps), positions, theta, scale)

    # x [n, heads, hd], positions [n]; rotate-half (NeoX) pairing, as in Gemma.
    def rope(self, x: np.ndarray, positions: np.ndarray, theta: float, scale: float = 1.0) -> np.ndarray:
        hd = x.shape[-1]
        inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
        inv = (inv / np.float32(scale)).astype(np.float32)
        ang = positions.astype(np.float32)[:, None] * inv[None, :]  # [n, hd/2]
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)

    # GeGLU with tanh GELU: gelu(g) * u
    def gelu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        return (0.5 * g * (1.0 + np.tanh(_SQRT_2_OVER_PI * (g + np.float32(0.044715) * g * g * g)))) * u

    def full_attention(self, q, k, v, scale):
        return full_attention_by_positions(self, q, k, v, scale)

    def sigmoid_mul(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return x * (np.float32(1.0) / (np.float32(1.0) + np.exp(-g)))

    def attention(
        self,
        q: np.ndarray,  # [n, H, hd]
        k: np.ndarray,  # [T, KV, hd]
        v: np.ndarray,  # [T, KV, hd]
        q_pos: np.ndarray,  # [n]
        k_pos: np.ndarray,  # [T]; -1 marks an empty slot
        window: int,  # 0 = global; else key visible iff q_pos - k_pos < window
        scale: float,
        softcap: float | None = None,
    ) -> np.ndarray:  # [n, H*hd]
        return attention_math(q, k, v, q_pos, k_pos, window, scale, softcap)

    def softcap(self, x: np.ndarray, cap: float) -> np.ndarray:
        return np.tanh(x / np.float32(cap)) * np.float32(cap)

    def depthwise_conv2d(self, x, taps, stride: int, top: int, left: int, out_hw):
        x, taps = np.asarray(x, np.float32), np.asarray(taps, np.float32)
        (H, W, C), k, s = x.shape, taps.shape[0], int(stride)
        oh, ow = int(out_hw[0]), int(out_hw[1])
        out = np.zeros((oh, ow, C), np.float32)
        rows, cols = np.arange(oh) * s - top, np.arange(ow) * s - left
        for i in range(k):  # each tap adds its in-range inputs times its per-channel weight
            r = rows + i
            ro = np.nonzero((r >= 0) & (r < H))[0]
            for j in range(k):
                c = cols + j
                co = np.nonzero((c >= 0) & (c < W))[0]
                if ro.size and co.size:
                    out[ro[:, None], co[None, :]] += x[r[ro][:, None], c[co][None, :]] * taps[i, j]
        return out


def bf16_round(x) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as float32; subnormals become
    signed zeros, as AVX512_BF16's conversion and the native bf16 attention path do."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    r = np.where((b & np.uint32(0x7F800000)) == 0, b & np.uint32(0x80000000), r).astype(np.uint32)
    return r.view(np.float32)


def attention_math(q, k, v, q_pos, k_pos, window, scale, softcap=None, cast=None) -> np.ndarray:
    """NumpyOps.attention. `cast` (float32 -> float32), when given, is applied to the inputs of
    both products (q, k; the unnormalized probabilities and v) while max, exp and sums stay
    float32: how benchmarks/bf16_attention.py simulates bf16 dot products."""
    c = cast or (lambda a: a)
    n, H, hd = q.shape
    T, KV, _ = k.shape
    G = H // KV
    k = c(np.asarray(k).astype(np.float32, copy=False))  # an fp16 KV cache is widened here
    v = c(np.asarray(v).astype(np.float32, copy=False))
    qg = c(np.asarray(q, dtype=np.float32)).reshape(n, KV, G, hd).transpose(1, 2, 0, 3)  # [KV, G, n, hd]
    kt = k.transpose(1, 2, 0)  # [KV, hd, T]
    s = np.matmul(qg, kt[:, None]) * np.float32(scale)  # [KV, G, n, T]
    if softcap:
        s = np.tanh(s / np.float32(softcap)) * np.float32(softcap)
    d = q_pos[:, None] - k_pos[None, :]
    visible = (k_pos[None, :] >= 0) & (d >= 0)
    if window:
        visible &= d < window
    s = np.where(visible[None, None], s, np.float32(-np.inf))
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    if cast is None:
        p /= p.sum(axis=-1, keepdims=True)
        o = np.matmul(p, v.transpose(1, 0, 2)[:, None])  # [KV, G, n, hd]
    else:  # a kernel sums the float32 probabilities and divides the output
        o = np.matmul(c(p), v.transpose(1, 0, 2)[:, None]) / p.sum(axis=-1, keepdims=True)
    return np.ascontiguousarray(o.transpose(2, 0, 1, 3).reshape(n, H * hd), dtype=np.float32)
