"""Fused native ops (CpuOps: rmsnorm, rope, gelu_mul, softcap, attention) against the numpy
reference op table, for every ISA build this CPU can run; bad input raises, never crashes.

Bounds (docs/kernels.md, "Error bounds"):
  rmsnorm   |y - ref| <= 1e-5 |ref| + 1e-7 |x| |w|   (fp32 sum of squares in another order)
  rope      |y - ref| <= 1e-6 (|x1| + |x2|)          (the same float32 cos/sin table)
  gelu_mul  |y - ref| <= 2e-6 (|g u| + |ref|)        (rational tanh, abs err ~1e-7)
  softcap   |y - ref| <= 2e-6 cap
  attention |y - ref| <= 2e-5 max|v|                 (fp32 dots, polynomial exp, online softmax)
"""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.backends import cpu, native
from edgelm.backends.numpy_ops import NumpyOps

if not native.available():
    pytest.fail(f"native kernels are not built/importable: {native.unavailable_reason()}", pytrace=False)

REF = NumpyOps()


@pytest.fixture(params=list(native.ALL_ISAS))
def ops(request):
    isa = request.param
    if not native.cpu_supports(isa):
        pytest.skip(f"{isa}: {native.isa_unavailable_reason(isa)}")
    o = cpu.CpuOps(isa)
    before = o._k.get_threads()
    o.set_threads(2)
    yield o
    o.set_threads(before)


def rng(*seed):
    return np.random.default_rng(list(seed))


# ----------------------------------------------------------------------------- elementwise

@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 640), (5, 4, 33), (513, 256), (2, 1000)])
def test_rmsnorm(ops, shape):
    r = rng(1, *shape)
    x = (r.standard_normal(shape) * 3).astype(np.float32)
    w = (1 + r.standard_normal(shape[-1])).astype(np.float32)
    y = ops.rmsnorm(x, w, 1e-6)
    ref = REF.rmsnorm(x, w, 1e-6)
    assert y.shape == ref.shape and y.dtype == np.float32
    bound = 1e-5 * np.abs(ref) + 1e-7 * np.abs(x) * np.abs(w) + 1e-30
    assert np.all(np.abs(y - ref) <= bound)
    # zeros stay finite (eps)
    assert np.all(ops.rmsnorm(np.zeros(shape, np.float32), w, 1e-6) == 0)


@pytest.mark.parametrize("n,heads,hd", [(1, 4, 256), (7, 1, 2), (5, 3, 18), (33, 4, 64), (3, 2, 30)])
@pytest.mark.parametrize("theta,scale", [(10_000.0, 1.0), (1_000_000.0, 8.0)])
def test_rope(ops, n, heads, hd, theta, scale):
    r = rng(2, n, heads, hd)
    x = r.standard_normal((n, heads, hd)).astype(np.float32)
    pos = np.sort(r.integers(0, 5000, n)).astype(np.int64)
    y = ops.rope(x, pos, theta, scale)
    ref = REF.rope(x, pos, theta, scale)
    half = hd // 2
    mag = np.concatenate([np.abs(x[..., :half]) + np.abs(x[..., half:])] * 2, axis=-1)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= 1e-6 * mag + 1e-30)
    # a second call with the same positions (cached table) and with other positions
    np.testing.assert_array_equal(ops.rope(x, pos, theta, scale), y)
    pos2 = pos + 1
    assert np.all(np.abs(ops.rope(x, pos2, theta, scale) - REF.rope(x, pos2, theta, scale)) <= 1e-6 * mag + 1e-30)


@pytest.mark.parametrize("shape", [(1,), (7,), (1, 2048), (3, 1001), (17, 2048)])
def test_gelu_mul(ops, shape):
    r = rng(3, *shape)
    g = (r.standard_normal(shape) * 4).astype(np.float32)
    g.flat[: min(g.size, 4)] = [0.0, 1e-5, -20.0, 20.0][: min(g.size, 4)]
    u = r.standard_normal(shape).astype(np.float32)
    y = ops.gelu_mul(g, u)
    ref = REF.gelu_mul(g, u)
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.all(np.abs(y - ref) <= 2e-6 * (np.abs(g * u) + np.abs(ref)) + 1e-30)


@pytest.mark.parametrize("cap", [30.0, 50.0, 1.0])
def test_softcap(ops, cap):
    x = (rng(4).standard_normal((3, 1003)) * 40).astype(np.float32)
    x[0, :5] = [0.0, 1e-6, -1e-6, 1e4, -1e4]
    y = ops.softcap(x, cap)
    ref = REF.softcap(x, cap)
    assert np.all(np.abs(y - ref) <= 2e-6 * cap)


# ----------------------------------------------------------------------------- attention

def check_attention(ops, q, k, v, qp, kp, window, scale, cap):
    y = ops.attention(q, k, v, qp, kp, window, scale, cap)
    with np.errstate(invalid="ignore"):
        ref = REF.attention(q, k, v, qp, kp, window, scale, cap)
    n, H, hd = q.shape
    assert y.shape == (n, H * hd) and y.dtype == np.float32
    dead = np.isnan(ref).any(axis=1)  # queries that see no key: numpy nan, native zeros
    assert np.all(y[dead] == 0)
    tol = 2e-5 * max(1.0, float(np.abs(v).max()))
    err = np.abs(y[~dead] - ref[~dead])
    assert err.size == 0 or err.max() <= tol, (err.max(), tol)
    return y


CASES = [
    # n, T, H, KV, hd, window
    (1, 1, 4, 1, 256, 0),
    (1, 70, 4, 1, 256, 0),
    (1, 700, 4, 1, 256, 512),   # decode, split over keys, window
    (1, 600, 8, 2, 64, 0),
    (1, 1300, 4, 4, 32, 0),
    (3, 40, 4, 2, 13, 0),       # odd head_dim
    (17, 17, 4, 1, 256, 0),     # prefill from empty
    (33, 100, 2, 2, 20, 16),
    (70, 150, 8, 2, 64, 50),
    (5, 9, 1, 1, 8, 3),
]


@pytest.mark.parametrize("n,T,H,KV,hd,window", CASES)
@pytest.mark.parametrize("cap", [None, 20.0])
def test_attention_cache_like(ops, n, T, H, KV, hd, window, cap):
    """Positions as the KV cache produces them: the chunk's queries are the newest n positions,
    the keys hold every position up to the newest (some slots empty for T > n)."""
    r = rng(5, n, T, H, KV, hd, window)
    q = r.standard_normal((n, H, hd)).astype(np.float32)
    k = r.standard_normal((T, KV, hd)).astype(np.float32)
    v = r.standard_normal((T, KV, hd)).astype(np.float32)
    last = T + 5
    kp = np.arange(last - T + 1, last + 1, dtype=np.int64)
    r.shuffle(kp)  # ring buffer order
    if T > n + 2:
        older = np.nonzero(kp <= last - n)[0]
        kp[r.choice(older, size=max(1, len(older) // 7), replace=False)] = -1
    qp = np.arange(last - n + 1, last + 1, dtype=np.int64)
    check_attention(ops, q, k, v, qp, kp, window, hd**-0.5, cap)


def test_decode_attention_prefetch_switch(ops):
    """Decode (<= 8 query rows per KV group) runs 16-key blocks and prefetches the next
    block's K/V (set_decode_prefetch(1), the default) or 64-key blocks without (0): both meet
    the reference bound on decode shapes (key counts off the block size, a sliding window,
    empty slots, fp16 and fp32 caches, G = 1..8), and neither depends on the thread count."""
    m = ops._k.module
    assert m.get_decode_prefetch() == 1
    try:
        for T, H, KV, hd, window in ((1, 4, 1, 256, 0), (37, 4, 1, 256, 0), (700, 4, 1, 256, 512),
                                     (301, 8, 1, 64, 0), (130, 2, 2, 20, 50), (95, 4, 4, 32, 0)):
            r = rng(15, T, H, KV, hd)
            q = r.standard_normal((1, H, hd)).astype(np.float32)
            k = r.standard_normal((T, KV, hd)).astype(np.float32)
            v = r.standard_normal((T, KV, hd)).astype(np.float32)
            kp = np.arange(T, dtype=np.int64)
            if T > 2:
                kp[T // 2] = -1  # an empty slot
            qp = np.array([T - 1], np.int64)
            for kv in ((k, v), (k.astype(np.float16), v.astype(np.float16))):
                for mode in (0, 1):
                    m.set_decode_prefetch(mode)
                    k_, v_ = (a.astype(np.float32) for a in kv)
                    y = ops.attention(q, *kv, qp, kp, window, hd ** -0.5)
                    with np.errstate(invalid="ignore"):
                        ref = REF.attention(q, k_, v_, qp, kp, window, hd ** -0.5)
                    assert np.abs(y - ref).max() <= 2e-5 * max(1.0, float(np.abs(v_).max())), (T, H, KV, hd, mode)
                    ops.set_threads(1)
                    np.testing.assert_array_equal(ops.attention(q, *kv, qp, kp, window, hd ** -0.5), y)
                    ops.set_threads(2)
    finally:
        m.set_decode_prefetch(1)
    with pytest.raises(ValueError, match="set_decode_prefetch"):
        m.set_decode_prefetch(2)


def test_attention_gqa_ratios_and_threads(ops):
    for G in (1, 2, 4):
        KV = 2
        H = KV * G
        r = rng(6, G)
        n, T, hd = 9, 300, 64
        q = r.standard_normal((n, H, hd)).astype(np.float32)
        k = r.standard_normal((T, KV, hd)).astype(np.float32)
        v = (r.standard_normal((T, KV, hd)) * 5).astype(np.float32)
        kp = np.arange(T, dtype=np.int64)
        qp = np.arange(T - n, T, dtype=np.int64)
        ops.set_threads(1)
        y1 = check_attention(ops, q, k, v, qp, kp, 0, 0.125, None)
        ops.set_threads(2)
        y2 = check_attention(ops, q, k, v, qp, kp, 0, 0.125, None)
        np.testing.assert_array_equal(y1, y2)  # no split differs between thread counts here


@pytest.mark.parametrize("n,T,H,KV,hd,window", [c for c in CASES if c[1] >= 17])
def test_attention_fp16_cache(ops, n, T, H, KV, hd, window):
    """An fp16 KV cache: the kernel widens K/V as it loads them, so the result is the fp32
    kernel's on the rounded keys/values (up to FMA contraction in the odd-head_dim tail), and
    within the usual bound of the numpy reference."""
    r = rng(8, n, T, H, KV, hd, window)
    q = r.standard_normal((n, H, hd)).astype(np.float32)
    k16 = r.standard_normal((T, KV, hd)).astype(np.float16)
    v16 = r.standard_normal((T, KV, hd)).astype(np.float16)
    kp = np.arange(T, dtype=np.int64)
    r.shuffle(kp)
    qp = np.arange(T - n, T, dtype=np.int64)
    y16 = ops.attention(q, k16, v16, qp, kp, window, hd**-0.5)
    y32 = check_attention(ops, q, k16.astype(np.float32), v16.astype(np.float32), qp, kp, window, hd**-0.5, None)
    assert np.max(np.abs(y16 - y32)) <= 1e-6 * np.max(np.abs(v16.astype(np.float32)))
    ref = REF.attention(q, k16, v16, qp, kp, window, hd**-0.5)  # the reference widens too
    assert np.max(np.abs(y16 - ref)) <= 2e-5 * np.max(np.abs(v16.astype(np.float32)))
    with pytest.raises(TypeError, match="v must be float16"):
        ops._m.attention(q, k16, v16.astype(np.float32), qp, kp, window, 1.0, 0.0,
                         np.empty((n, H * hd), np.float32))


def test_attention_masking_edges(ops):
    r = rng(7)
    H, KV, hd = 4, 2, 16
    q = r.standard_normal((3, H, hd)).astype(np.float32)
    k = r.standard_normal((6, KV, hd)).astype(np.float32)
    v = r.standard_normal((6, KV, hd)).astype(np.float32)
    # every slot empty -> zeros
    y = ops.attention(q, k, v, np.array([0, 1, 2]), np.full(6, -1), 0, 1.0)
    assert np.all(y == 0)
    # no keys at all
    y = ops.attention(q, k[:0], v[:0], np.array([0, 1, 2]), np.zeros(0, np.int64), 0, 1.0)
    assert y.shape == (3, H * hd) and np.all(y == 0)
    # keys only in the future for the first query; window 1 = only the own position
    kp = np.array([5, 1, 2, -1, 3, 4])
    check_attention(ops, q, k, v, np.array([0, 2, 4]), kp, 0, 0.5, None)
    check_attention(ops, q, k, v, np.array([1, 2, 4]), kp, 1, 0.5, None)
    # large scores (stable softmax)
    check_attention(ops, q * 100, k, v, np.array([3, 4, 5]), kp, 0, 1.0, None)
    # n = 0
    assert ops.attention(q[:0], k, v, np.zeros(0, np.int64), kp, 0, 1.0).shape == (0, H * hd)


# ----------------------------------------------------------------------------- bad input

def _bf16_case(n, T, H, KV, hd, half, seed=0):
    """Cache-like attention inputs: ring order, some older slots empty, the newest n queries."""
    r = rng(21, n, T, H, KV, hd, seed)
    q = r.standard_normal((n, H, hd)).astype(np.float32)
    dt = np.float16 if half else np.float32
    k = r.standard_normal((T, KV, hd)).astype(dt)
    v = (r.standard_normal((T, KV, hd)) * 3).astype(dt)
    last = T + 3
    kp = np.arange(last - T + 1, last + 1, dtype=np.int64)
    r.shuffle(kp)
    if T > n + 2:
        older = np.nonzero(kp <= last - n)[0]
        kp[r.choice(older, size=max(1, len(older) // 5), replace=False)] = -1
    qp = np.arange(last - n + 1, last + 1, dtype=np.int64)
    return q, k, v, qp, kp


BF16_CASES = CASES + [(128, 512, 4, 1, 256, 0), (128, 300, 4, 1, 256, 128), (40, 77, 6, 3, 40, 0)]


@pytest.mark.parametrize("n,T,H,KV,hd,window", BF16_CASES)
def test_attention_bf16(ops, n, T, H, KV, hd, window):
    """attention(bf16=True): on builds with the bf16 path (vdpbf16ps, or the emulating vnniemu
    build) and a CPU that runs it, within 2^-8 max|v| of the reference math with Q, K, the
    probabilities and V rounded to bf16 (numpy_ops.bf16_round; the kernel rounds each block's
    probabilities against that block's running max, the reference against the row's max),
    for fp32 and fp16 caches, key splits (decode shapes), softcap, and thread counts (no bit
    changes); on builds without it, and in batch-invariant mode, the flag changes no bit."""
    from edgelm.backends.numpy_ops import attention_math, bf16_round

    k_, m = ops._k, ops._m
    has = bool(m.ATTN_BF16) and m.attn_bf16_ready()
    for half, cap in ((False, None), (True, None), (True, 30.0)):
        q, k, v, qp, kp = _bf16_case(n, T, H, KV, hd, half)
        scale = hd ** -0.5
        y = k_.attention(q, k, v, qp, kp, window, scale, cap, bf16=True)
        y32 = k_.attention(q, k, v, qp, kp, window, scale, cap)
        if not has:
            np.testing.assert_array_equal(y, y32)
            continue
        with np.errstate(invalid="ignore"):
            ref = attention_math(q, k, v, qp, kp, window, scale, cap, cast=bf16_round)
        dead = np.isnan(ref).any(axis=1)
        assert np.all(y[dead] == 0)
        tol = 2.0 ** -8 * float(np.abs(v.astype(np.float32)).max()) + 1e-5
        err = np.abs(y[~dead] - ref[~dead])
        assert err.size == 0 or err.max() <= tol, (err.max(), tol, half, cap)
        ops.set_threads(1)
        np.testing.assert_array_equal(k_.attention(q, k, v, qp, kp, window, scale, cap, bf16=True), y)
        ops.set_threads(2)
        m.set_deterministic(1)
        try:
            np.testing.assert_array_equal(k_.attention(q, k, v, qp, kp, window, scale, cap, bf16=True),
                                          k_.attention(q, k, v, qp, kp, window, scale, cap))
        finally:
            m.set_deterministic(0)


def test_attention_bf16_emulation_is_bitwise():
    """The emulating build (vnniemu: two FMAs per bf16 pair, the odd element's first) gives
    vdpbf16ps's bits exactly, so CI hosts without AVX512_BF16 test the same path. Needs a CPU
    with AVX512_BF16 to compare against."""
    if not (native.cpu_supports("avx512") and native.cpu_supports("vnniemu")):
        pytest.skip("needs the avx512 and vnniemu builds")
    hw, emu = native.kernels("avx512"), native.kernels("vnniemu")
    if hw.module.ATTN_BF16 != "vdpbf16ps" or not hw.module.attn_bf16_ready():
        pytest.skip("this CPU has no AVX512_BF16")
    assert emu.module.ATTN_BF16 == "emulated"
    for n, T, H, KV, hd, window in BF16_CASES:
        for half in (False, True):
            q, k, v, qp, kp = _bf16_case(n, T, H, KV, hd, half, seed=1)
            args = (q, k, v, qp, kp, window, hd ** -0.5, None)
            np.testing.assert_array_equal(hw.attention(*args, bf16=True), emu.attention(*args, bf16=True))


def test_attn_precision_switch(ops):
    """CpuOps.set_attn_precision("bf16") takes effect only where the build and CPU have the
    path, never in batch-invariant mode; then prompt-sized calls (16+ query rows) take it and
    decode-sized ones stay fp32."""
    m = ops._m
    has = bool(m.ATTN_BF16) and m.attn_bf16_ready()
    try:
        assert ops.set_attn_precision("bf16") == has
        q, k, v, qp, kp = _bf16_case(16, 100, 4, 1, 64, True)
        args = (q, k, v, qp, kp, 0, 0.125, None)
        np.testing.assert_array_equal(ops.attention(*args), ops._k.attention(*args, bf16=has))
        one = (q[-1:], k, v, qp[-1:], kp, 0, 0.125, None)
        np.testing.assert_array_equal(ops.attention(*one), ops._k.attention(*one))
        ops.set_deterministic(True)
        assert ops.set_attn_precision("bf16") is False
    finally:
        ops.set_deterministic(False)
        ops.set_attn_precision("f32")
    assert ops.attn_bf16 is False


def test_bad_inputs_raise(ops):
    m = ops._m
    f32 = np.float32
    x = np.ones((2, 8), f32)
    with pytest.raises(ValueError, match="shape"):
        m.rmsnorm(x, np.ones(7, f32), 1e-6, np.empty_like(x))
    with pytest.raises(TypeError, match="float32"):
        m.rmsnorm(x.astype(np.float64), np.ones(8, f32), 1e-6, np.empty_like(x))
    with pytest.raises(ValueError, match="C-contiguous"):
        m.rmsnorm(np.ones((8, 2), f32).T, np.ones(2, f32), 1e-6, np.empty((2, 8), f32).T)
    with pytest.raises(ValueError, match="writable"):
        ro = np.empty_like(x)
        ro.flags.writeable = False
        m.rmsnorm(x, np.ones(8, f32), 1e-6, ro)
    with pytest.raises(ValueError, match="overlap"):
        buf = np.ones(20, f32)
        m.rmsnorm(buf[:16].reshape(2, 8), np.ones(8, f32), 1e-6, buf[4:20].reshape(2, 8))
    with pytest.raises(TypeError, match="numpy array"):
        m.rmsnorm([[1.0] * 8], np.ones(8, f32), 1e-6, np.empty_like(x))
    # rope
    xr = np.ones((2, 3, 8), f32)
    with pytest.raises(ValueError, match="even"):
        m.rope(np.ones((2, 3, 7), f32), np.ones((2, 3), f32), np.ones((2, 3), f32), np.empty((2, 3, 7), f32))
    with pytest.raises(ValueError, match="shape"):
        m.rope(xr, np.ones((2, 3), f32), np.ones((2, 4), f32), np.empty_like(xr))
    with pytest.raises(ValueError, match="shape"):
        m.rope(np.ones((6, 8), f32), np.ones((6, 4), f32), np.ones((6, 4), f32), np.empty((6, 8), f32))
    # gelu / softcap
    with pytest.raises(ValueError, match="shape"):
        m.gelu_mul(x, np.ones((2, 7), f32), np.empty_like(x))
    with pytest.raises(ValueError, match="cap"):
        m.softcap(x, 0.0, np.empty_like(x))
    with pytest.raises(ValueError, match="cap"):
        m.softcap(x, float("nan"), np.empty_like(x))
    # attention
    q = np.ones((2, 4, 8), f32)
    k = np.ones((5, 2, 8), f32)
    qp = np.array([3, 4], np.int64)
    kp = np.arange(5, dtype=np.int64)
    out = np.empty((2, 32), f32)
    m.attention(q, k, k.copy(), qp, kp, 0, 1.0, 0.0, out)  # the good call
    bad = [
        ((q, np.ones((5, 3, 8), f32), np.ones((5, 3, 8), f32), qp, kp, 0, 1.0, 0.0, out), ValueError, "group"),
        ((q, np.ones((5, 2, 7), f32), np.ones((5, 2, 7), f32), qp, kp, 0, 1.0, 0.0, out), ValueError, "head_dim"),
        ((q, k, np.ones((4, 2, 8), f32), qp, kp, 0, 1.0, 0.0, out), ValueError, "shape"),
        ((q, k, k, qp.astype(np.int32), kp, 0, 1.0, 0.0, out), TypeError, "int64"),
        ((q, k, k, qp, kp[:4], 0, 1.0, 0.0, out), ValueError, "shape"),
        ((q, k, k, qp, kp, -1, 1.0, 0.0, out), ValueError, "window"),
        ((q, k, k, qp, kp, 0, float("inf"), 0.0, out), ValueError, "scale"),
        ((q, k, k, qp, kp, 0, 1.0, -1.0, out), ValueError, "softcap"),
        ((q, k, k, qp, kp, 0, 1.0, 0.0, np.empty((2, 31), f32)), ValueError, "shape"),
        ((q.astype(np.float16), k, k, qp, kp, 0, 1.0, 0.0, out), TypeError, "float32"),
        ((q[0], k, k, qp, kp, 0, 1.0, 0.0, out), ValueError, "shape"),
        ((q, k, k, qp, kp, 0, 1.0, 0.0, q.reshape(2, 32)), ValueError, "overlap"),
        ((q, k, k, qp, kp, 0, 1.0, 0.0, None), TypeError, "numpy array"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            m.attention(*args)
    # the Python layer also rejects non-integer positions
    with pytest.raises(TypeError, match="integers"):
        ops.attention(q, k, k, qp.astype(np.float32), kp, 0, 1.0)


def test_stream_probe():
    gbs = native.stream_read_gbs(8 << 20, threads=1, passes=2)
    assert 0.1 < gbs < 10_000
    with pytest.raises(ValueError):
        native.stream_read_gbs(10, threads=1)
    with pytest.raises(ValueError):
        native.stream_read_gbs(8 << 20, threads=0)


def test_cpu_op_table_is_complete():
    """Every op the reference table defines has a native override."""
    names = [n for n, v in vars(NumpyOps).items() if callable(v) and not n.startswith("_") and n != "set_threads"]
    for n in names:
        assert getattr(cpu.CpuOps, n) is not getattr(NumpyOps, n), n


# ----------------------------------------------------------------------------- fused residual, q/k norm + rope

@pytest.mark.parametrize("n,d", [(1, 640), (7, 33), (64, 640), (3, 8)])
@pytest.mark.parametrize("with_next", [True, False])
def test_add_rmsnorm(ops, n, d, with_next):
    r = rng(11, n, d)
    x = (r.standard_normal((n, d)) * 5).astype(np.float32)
    h = (r.standard_normal((n, d)) * 2).astype(np.float32)
    wp = (1 + r.standard_normal(d)).astype(np.float32)
    wn = (1 + r.standard_normal(d)).astype(np.float32) if with_next else None
    rx, rn = REF.add_rmsnorm(x.copy(), h, wp, 1e-6, wn)
    x_in = x.copy()
    gx, gn = ops.add_rmsnorm(x_in, h, wp, 1e-6, wn)
    assert gx is x_in  # updated in place
    assert np.all(np.abs(gx - rx) <= 1e-5 * (np.abs(x) + np.abs(rx - x)) + 1e-6)
    if with_next:
        assert np.all(np.abs(gn - rn) <= 2e-5 * np.abs(rn) + 1e-5 * np.abs(wn))
    else:
        assert gn is None and rn is None


@pytest.mark.parametrize("n,heads,hd", [(1, 4, 256), (5, 1, 256), (9, 3, 18), (2, 2, 2)])
def test_rmsnorm_rope(ops, n, heads, hd):
    r = rng(12, n, heads, hd)
    x = (r.standard_normal((n, heads, hd)) * 3).astype(np.float32)
    w = (1 + r.standard_normal(hd)).astype(np.float32)
    pos = np.arange(100, 100 + n, dtype=np.int64)
    got = ops.rmsnorm_rope(x, w, 1e-6, pos, 10_000.0, 1.0)
    ref = REF.rmsnorm_rope(x, w, 1e-6, pos, 10_000.0, 1.0)
    assert np.all(np.abs(got - ref) <= 2e-5 * (np.abs(x).max(axis=-1, keepdims=True) * np.abs(w).max() + 1))


def test_fused_norm_ops_validate(ops):
    m = ops._m
    x = np.zeros((2, 8), np.float32)
    w = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="both w_next and next"):
        m.add_rmsnorm(x, x.copy(), w, 1e-6, w, None)
    with pytest.raises(ValueError, match="overlap"):
        m.add_rmsnorm(x, x, w, 1e-6, None, None)
    with pytest.raises(ValueError, match="shape"):
        m.add_rmsnorm(x, np.zeros((3, 8), np.float32), w, 1e-6, None, None)
    with pytest.raises(ValueError, match="writable"):
        ro = x.copy()
        ro.flags.writeable = False
        m.add_rmsnorm(ro, x.copy(), w, 1e-6, None, None)
    q = np.zeros((2, 1, 8), np.float32)
    cs = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="head_dim must be even"):
        m.rmsnorm_rope(np.zeros((2, 1, 7), np.float32), np.ones(7, np.float32), cs, cs, 1e-6, np.zeros((2, 1, 7), np.float32))
    with pytest.raises(ValueError, match="eps"):
        m.rmsnorm_rope(q, w, cs, cs, -1.0, q.copy())
    with pytest.raises(ValueError, match="shape"):
        m.rmsnorm_rope(q, np.ones(4, np.float32), cs, cs, 1e-6, q.copy())
