"""Weight quantization schemes: one traits entry per scheme, with a numpy reference.

A 2-D weight W[rows, cols] (rows = output channels) is stored as named parts:

  fp32       w      float32 [rows, cols]
  fp16       w      float16 [rows, cols]
  int8       q      int8    [rows, cols]       scale float32 [rows]         (per output channel)
  int8-b32   q      int8    [rows, cols]       scale float16 [rows, cols/32] (GGUF Q8_0 layout)
  int4-b32   q      uint8   [rows, cols/2]     scale float16 [rows, cols/32] (GGUF Q4_0 layout)
  int4-b128  q      uint8   [rows, cols/2]     scale float16 [rows, cols/128]

int4 nibbles: within each run of 32 weights, byte j holds weight j in its low nibble and
weight j+16 in its high nibble; the value is (nibble - 8) * scale. This is GGUF's Q4_0
layout, so Q4_0 blocks pass through conversion unchanged. All schemes are symmetric.

Every fast kernel is tested against `dequantize` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import BadInputError

PartSpec = dict[str, tuple[np.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Scheme:
    name: str
    id: int  # stable number used by the native kernels and the bundle
    block: int  # weights per scale along a row; 0 = no scale, -1 = one scale per row
    weight_bits: int
    part_specs: Callable[[int, int], PartSpec] = field(repr=False)
    quantize: Callable[[np.ndarray], dict[str, np.ndarray]] = field(repr=False)
    dequantize: Callable[[dict[str, np.ndarray], int, int], np.ndarray] = field(repr=False)
    # A stated bound on |w - dequantize(quantize(w))| per weight, given the absolute
    # maximum of the weight's scale group. Tests check the reference against it.
    error_bound: Callable[[np.ndarray], np.ndarray] = field(repr=False)

    def check_shape(self, rows: int, cols: int) -> None:
        if self.block > 0 and cols % self.block:
            raise BadInputError(
                f"scheme {self.name} needs a row length that is a multiple of {self.block}, got {cols}"
            )

    def nbytes(self, rows: int, cols: int) -> int:
        return sum(int(np.dtype(dt).itemsize * np.prod(shape)) for dt, shape in self.part_specs(rows, cols).values())

    def bits_per_weight(self, rows: int, cols: int) -> float:
        return 8.0 * self.nbytes(rows, cols) / (rows * cols)


# ----------------------------------------------------------------------------- fp32 / fp16

def _float_specs(dtype):
    return lambda r, c: {"w": (np.dtype(dtype), (r, c))}


def _float_quant(dtype):
    def q(w: np.ndarray) -> dict[str, np.ndarray]:
        return {"w": np.ascontiguousarray(w, dtype=dtype)}

    return q


def _float_dequant(p, rows, cols):
    return p["w"].astype(np.float32).reshape(rows, cols)


# ----------------------------------------------------------------------------- int8 per channel

def _int8_specs(r, c):
    return {"q": (np.dtype(np.int8), (r, c)), "scale": (np.dtype(np.float32), (r,))}


def _int8_quant(w: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=1)
    scale = (amax / 127.0).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)
    return {"q": q, "scale": scale}


def _int8_dequant(p, rows, cols):
    return p["q"].astype(np.float32).reshape(rows, cols) * p["scale"].reshape(rows, 1)


# ----------------------------------------------------------------------------- blocked int8 (Q8_0)

def _int8b_specs(r, c):
    return {"q": (np.dtype(np.int8), (r, c)), "scale": (np.dtype(np.float16), (r, c // 32))}


def _int8b_quant(w: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(w, dtype=np.float32)
    r, c = w.shape
    b = w.reshape(r, c // 32, 32)
    d = (np.abs(b).max(axis=2) / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 > 0)
    q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int8)
    return {"q": q.reshape(r, c), "scale": d}


def _int8b_dequant(p, rows, cols):
    q = p["q"].astype(np.float32).reshape(rows, cols // 32, 32)
    return (q * p["scale"].astype(np.float32).reshape(rows, cols // 32, 1)).reshape(rows, cols)


# ----------------------------------------------------------------------------- blocked int4

def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q: uint8 values 0..15, [rows, cols] -> packed [rows, cols/2] (Q4_0 order per 32)."""
    r, c = q.shape
    g = q.reshape(r, c // 32, 2, 16)
    return (g[:, :, 0, :] | (g[:, :, 1, :] << 4)).astype(np.uint8).reshape(r, c // 2)


def unpack_nibbles(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Inverse of pack_nibbles: returns uint8 values 0..15, [rows, cols]."""
    g = packed.reshape(rows, cols // 32, 1, 16)
    lo = g & 0x0F
    hi = g >> 4
    return np.concatenate([lo, hi], axis=2).reshape(rows, cols)


def _int4_specs(bs):
    return lambda r, c: {"q": (np.dtype(np.uint8), (r, c // 2)), "scale": (np.dtype(np.float16), (r, c // bs))}


# Scale search for int4 blocks: each block tries the divisors in _INT4_DIVISORS, i.e.
# scale = m / -D for the block's signed absolute maximum m (D = 8 is GGUF Q4_0's choice,
# which maps m onto -8). Larger D clips m a little to give the other weights finer steps.
# The divisor with the least (importance-weighted) squared error wins.
_INT4_DIVISORS = np.round(np.arange(7.0, 10.01, 0.125), 3)
_INT4_ROWS_PER_STEP = 2048  # bounds the search's temporaries (~ rows * cols * 4 bytes each)


def _int4_search(b: np.ndarray, m: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    """b: [r, nb, bs] weights, m: [r, nb] signed absmax -> fp16 scales [r, nb]."""
    best_d = (m / -8.0).astype(np.float16)
    best_e = None
    for D in _INT4_DIVISORS:
        d = (m / -D).astype(np.float16)
        d32 = d.astype(np.float32)
        inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
        qv = np.clip(np.rint(b * inv[..., None]), -8, 7)
        err = (b - qv * d32[..., None]) ** 2
        if imp is not None:
            err *= imp
        e = err.sum(axis=2)
        if best_e is None:
            best_e, best_d = e, d
        else:
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_d = np.where(better, d, best_d)
    # Refit: with the levels fixed, the scale of least weighted squared error is
    # sum(w x q) / sum(w q^2); keep it where it helps and stays within the stated bound.
    d32 = best_d.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    qv = np.clip(np.rint(b * inv[..., None]), -8, 7)
    wq = qv * imp if imp is not None else qv
    den = (wq * qv).sum(axis=2)
    d_fit = np.divide((wq * b).sum(axis=2), den, out=d32.copy(), where=den > 0).astype(np.float16)
    f32 = d_fit.astype(np.float32)[..., None]
    diff = b - qv * f32
    err = diff ** 2
    if imp is not None:
        err *= imp
    ok = (err.sum(axis=2) < best_e) & (np.abs(diff).max(axis=2) <= 0.3 * np.abs(m)) & np.isfinite(f32[..., 0])
    return np.where(ok, d_fit, best_d)


def _int4_quant(bs):
    def q(w: np.ndarray, importance: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`importance` (cols,), optional: how much each input column's error counts,
        e.g. the mean square of the activations it meets (see edgelm.convert.importance)."""
        w = np.asarray(w, dtype=np.float32)
        r, c = w.shape
        b = w.reshape(r, c // bs, bs)
        imp = None
        if importance is not None:
            imp = np.asarray(importance, dtype=np.float32).reshape(1, c // bs, bs)
        # The signed value of largest magnitude; its sign decides which end of -8..7 it uses.
        idx = np.abs(b).argmax(axis=2)
        m = np.take_along_axis(b, idx[..., None], axis=2)[..., 0]
        d = np.empty((r, c // bs), dtype=np.float16)
        for r0 in range(0, r, _INT4_ROWS_PER_STEP):
            sl = slice(r0, r0 + _INT4_ROWS_PER_STEP)
            d[sl] = _int4_search(b[sl], m[sl], imp)
        d32 = d.astype(np.float32)
        inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
        qv = np.clip(np.rint(b * inv[..., None]) + 8, 0, 15).astype(np.uint8)
        return {"q": pack_nibbles(qv.reshape(r, c)), "scale": d}

    return q


def _int4_dequant(bs):
    def dq(p, rows, cols):
        v = unpack_nibbles(p["q"], rows, cols).astype(np.float32) - 8.0
        s = p["scale"].astype(np.float32).reshape(rows, cols // bs, 1)
        return (v.reshape(rows, cols // bs, bs) * s).reshape(rows, cols)

    return dq


# ----------------------------------------------------------------------------- the table

def _rel(frac):
    return lambda amax: np.asarray(amax, dtype=np.float64) * frac


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("fp32", 0, 0, 32, _float_specs(np.float32), _float_quant(np.float32), _float_dequant, _rel(0.0)),
        # fp16 rounding: half an ulp (2**-11 relative), or half the subnormal step (2**-25).
        Scheme("fp16", 1, 0, 16, _float_specs(np.float16), _float_quant(np.float16), _float_dequant,
               lambda amax: np.asarray(amax, dtype=np.float64) * 2.0**-11 + 2.0**-25),
        Scheme("int8", 2, -1, 8, _int8_specs, _int8_quant, _int8_dequant, _rel(0.5 / 127 * 1.0001)),
        # fp16 scale rounding can push the largest weight to the clip edge: allow 1/127 + ulp.
        Scheme("int8-b32", 3, 32, 8, _int8b_specs, _int8b_quant, _int8b_dequant, _rel(1.0 / 127 * 1.01)),
        # The largest weight maps to -8; an opposite-sign weight of equal size clips at +7.
        # The scale search clips the largest weight at most to 8/10 of it, and an
        # opposite-sign weight of equal size at 7/10 (plus fp16 scale rounding).
        Scheme("int4-b32", 4, 32, 4, _int4_specs(32), _int4_quant(32), _int4_dequant(32), _rel(0.3 * 1.01)),
        Scheme("int4-b128", 5, 128, 4, _int4_specs(128), _int4_quant(128), _int4_dequant(128), _rel(0.3 * 1.01)),
    ]
}
SCHEME_BY_ID = {s.id: s for s in SCHEMES.values()}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise BadInputError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}") from None


@dataclass
class QTensor:
    """A 2-D (or 1-D, fp32 only) weight together with its scheme."""

    scheme: Scheme
    shape: tuple[int, ...]
    parts: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts.values())

    def dequantize(self) -> np.ndarray:
        if len(self.shape) == 1:
            return np.asarray(self.parts["w"], dtype=np.float32).reshape(self.shape)
        return self.scheme.dequantize(self.parts, self.rows, self.cols).reshape(self.shape)

    def dequantize_rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantize only the selected rows (embedding lookup)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids.shape[0]
        sub = {}
        for k, v in self.parts.items():
            sub[k] = v[ids] if v.ndim >= 1 and v.shape[0] == self.rows else v
        return self.scheme.dequantize(sub, n, self.cols)


def quantize(w: np.ndarray, scheme: str | Scheme, importance: np.ndarray | None = None) -> QTensor:
    """`importance`: optional per-input-column weights of the squared error, used by the
    schemes that search their scales (int4); the others ignore it."""
    s = get_scheme(scheme) if isinstance(scheme, str) else scheme
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 1:
        if s.name != "fp32":
            raise BadInputError(f"1-D tensors are stored as fp32, not {s.name}")
        return QTensor(s, w.shape, {"w": np.ascontiguousarray(w)})
    rows, cols = w.shape[0], int(np.prod(w.shape[1:]))
    s.check_shape(rows, cols)
    if importance is not None and s.weight_bits == 4:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape != (cols,):
            raise BadInputError(f"importance has {importance.size} entries for a row of {cols}")
        return QTensor(s, tuple(w.shape), s.quantize(w.reshape(rows, cols), importance))
    return QTensor(s, tuple(w.shape), s.quantize(w.reshape(rows, cols)))


def dequantize(t: QTensor) -> np.ndarray:
    return t.dequantize()
