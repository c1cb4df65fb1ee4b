"""Native CPU kernels (edgelm/_native via edgelm.backends.native) against the numpy reference
in edgelm.quant.schemes, for every scheme and every ISA build this CPU can run.

Both activation paths of the integer schemes are tested: the exact fp32-activation kernels
(qd8=False) and the int8-quantized-activation ("qd8") kernels (qd8=True); the default
(qd8=None) picks one per scheme and row count."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.backends import native
from edgelm.backends.numpy_ops import NumpyOps
from edgelm.quant.schemes import SCHEMES, QTensor, quantize

if not native.available():
    pytest.fail(f"native kernels are not built/importable: {native.unavailable_reason()}", pytrace=False)

ISAS = list(native.ALL_ISAS)


@pytest.fixture(params=ISAS)
def kern(request):
    """One ISA build. Skipped only when this CPU can't run it; a build the CPU supports but
    that failed to build or import is a failure, not a skip."""
    isa = request.param
    if not native.cpu_supports(isa):
        pytest.skip(f"{isa}: {native.isa_unavailable_reason(isa)}")
    k = native.kernels(isa)
    before = k.get_threads()
    yield k
    k.set_threads(before)


# Column counts per scheme: multiples of the block for blocked schemes, odd sizes elsewhere.
COLS = {
    "fp32": [1, 7, 33, 100, 640],
    "fp16": [1, 7, 33, 100, 640],
    "int8": [1, 7, 33, 100, 640],
    "int8-b32": [32, 96, 640],
    "int4-b32": [32, 96, 640],
    "int4-b128": [128, 384],
}
ROWS = [1, 3, 17, 257]
NS = [1, 2, 5, 9, 33]

_cache: dict = {}


def qtensor(scheme: str, rows: int, cols: int, seed: int = 0) -> QTensor:
    key = (scheme, rows, cols, seed)
    if key not in _cache:
        rng = np.random.default_rng([seed, rows, cols, len(scheme)])
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        _cache[key] = quantize(w, scheme)
    return _cache[key]


def check_matmul(k, t: QTensor, x: np.ndarray, y: np.ndarray, chain: int | None = None) -> None:
    """Elementwise error bound for an fp32 dot product of length K, whatever the summation order
    (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1): |fl(x.w) - x.w| <=
    gamma_m * sum_i |x_i||w_i|, gamma_m = m*u / (1 - m*u), u = 2**-24, where m bounds the number
    of roundings any single term goes through. Every kernel (scalar, AVX2, NEON) accumulates in
    8 float lanes, each lane adding at most ceil(K/8) terms in sequence, then a 3-level
    horizontal tree, a scalar tail of < 32 terms and at most 3 rounded multiplies (weight*scale,
    x*w, row scale); so m = K//8 + 48 covers it. The reference is float64 on the float32
    dequantized weights (exact products), so its own error is negligible. Unlike a bound on
    max|x|*max|W|*sqrt(K) this one scales with the actual terms, and it is tight enough that
    the realistic bugs (a swapped nibble half, a wrong block scale, a dropped 8-lane group,
    even a single weight off by one int4 step) exceed it at every K tested."""
    W = t.dequantize().astype(np.float64)
    x64 = x.astype(np.float64)
    ref = x64 @ W.T
    mag = np.abs(x64) @ np.abs(W).T
    cols = t.cols
    # chain: the roundings a term can go through where a kernel sums otherwise (the float
    # GEMM sums each output over k in sequence: cols additions, one multiply, block adds)
    m = cols // 8 + 48 if chain is None else chain
    u = 2.0**-24
    gamma = m * u / (1 - m * u)
    err = np.abs(y.astype(np.float64) - ref)
    bound = gamma * mag + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{k.isa} {t.scheme.name} rows={t.rows} cols={cols} n={x.shape[0]}: "
        f"err {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matmul_matches_reference(kern, scheme):
    rng = np.random.default_rng(1)
    for cols in COLS[scheme]:
        for rows in ROWS:
            t = qtensor(scheme, rows, cols)
            for n in NS:
                x = rng.standard_normal((n, cols)).astype(np.float32)
                y = kern.matmul(x, t, qd8=False)
                assert y.shape == (n, rows) and y.dtype == np.float32
                check_matmul(kern, t, x, y)
            # 1-D x gives a 1-D result equal to the n=1 row
            x1 = rng.standard_normal(cols).astype(np.float32)
            y1 = kern.matmul(x1, t)
            assert y1.shape == (rows,)
            np.testing.assert_array_equal(y1, kern.matmul(x1[None, :], t)[0])


def qd8_activations(x: np.ndarray) -> np.ndarray:
    """The activations the qd8 kernels multiply with, in float64: per 32-block (a partial last
    block on its own) amax = max|x|, d = fl32(amax / 127), q = rint(fl32(x * fl32(127 / amax))),
    x_hat = q * d. Same float32 operations as the C++ (bitwise-equal q and d)."""
    n, c = x.shape
    nbt = (c + 31) // 32
    xp = np.zeros((n, nbt * 32), np.float32)
    xp[:, :c] = x
    b = xp.reshape(n, nbt, 32)
    amax = np.abs(b).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    q = np.clip(np.rint(b * inv.astype(np.float32)[..., None]), -127, 127)
    d = (amax / np.float32(127)).astype(np.float32)
    return (q * d[..., None].astype(np.float64)).reshape(n, -1)[:, :c]


def check_qd8(k, t: QTensor, x: np.ndarray, y: np.ndarray) -> None:
    """Two bounds for the qd8 path (docs/kernels.md, "Error bounds").

    (a) Against the exact product with the quantized activations x_hat (qd8_activations): the
        integer block sums are exact, so only float rounding remains: the fp32 bound of
        check_matmul with x_hat in place of x (the per-block terms see <= 3 roundings each and
        at most cols/32 + 8 additions: m = cols//8 + 48 covers that with room to spare).
    (b) Against the exact fp32-activation product: activation quantization moves each x_k by at
        most d_b/2 * (1 + 2**-16) <= amax_b / 254 * (1 + 2**-15) (rounding to the nearest of
        the levels q*d, with d and 127/amax each rounded once), so
            |y - x.W| <= sum_k |w_k| * amax_b(k) / 254 * (1 + 2**-15) + the (a) bound.
    """
    W = t.dequantize().astype(np.float64)
    xh = qd8_activations(x)
    u = 2.0**-24
    m = t.cols // 8 + 48
    gamma = m * u / (1 - m * u)
    y64 = y.astype(np.float64)
    bound_a = gamma * (np.abs(xh) @ np.abs(W).T) + 1e-30
    err_a = np.abs(y64 - xh @ W.T)
    worst = np.unravel_index(np.argmax(err_a / bound_a), err_a.shape)
    assert np.all(err_a <= bound_a), (
        f"{k.isa} qd8 {t.scheme.name} rows={t.rows} cols={t.cols} n={x.shape[0]}: "
        f"err {err_a[worst]:.3g} > bound {bound_a[worst]:.3g} at {worst} (vs quantized activations)"
    )
    n, c = x.shape
    nbt = (c + 31) // 32
    xp = np.zeros((n, nbt * 32), np.float64)
    xp[:, :c] = np.abs(x)
    amax_k = np.repeat(xp.reshape(n, nbt, 32).max(axis=2), 32, axis=1)[:, :c]
    bound_b = (amax_k / 254 * (1 + 2.0**-15)) @ np.abs(W).T + bound_a
    err_b = np.abs(y64 - x.astype(np.float64) @ W.T)
    assert np.all(err_b <= bound_b), f"{k.isa} qd8 {t.scheme.name}: a-priori activation bound exceeded"


INT_SCHEMES = ["int8", "int8-b32", "int4-b32", "int4-b128"]


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_qd8_matmul_matches_reference(kern, scheme):
    rng = np.random.default_rng(11)
    for cols in COLS[scheme]:
        for rows in ROWS:
            t = qtensor(scheme, rows, cols)
            for n in NS:
                x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
                if n > 2:
                    x[1] = 0  # an all-zero row: d = 0 blocks
                    x[2, : min(cols, 40)] *= 1000  # an outlier block
                y = kern.matmul(x, t, qd8=True)
                assert y.shape == (n, rows) and y.dtype == np.float32
                check_qd8(kern, t, x, y)


@pytest.mark.parametrize("scheme", ["int4-b32", "int4-b128"])
def test_int4_gemv_groups(kern, scheme):
    """The one-row int4 GEMV (decode) reduces 4 block pairs at a time by horizontal adds and
    handles the leftover pairs and an odd last block one by one: every mix of full groups,
    leftover pairs and an odd block, on 1 and 2 threads, against the reference (bound (a))
    and against the multi-row tile's result for the same row (float rounding only)."""
    cols_list = {"int4-b32": [256, 288, 352, 544, 1184], "int4-b128": [256, 384, 640, 1152]}[scheme]
    rng = np.random.default_rng(17)
    before = kern.get_threads()
    try:
        for cols in cols_list:
            t = qtensor(scheme, 257, cols)
            x = (rng.standard_normal((2, cols)) * rng.uniform(0.1, 10, (2, 1))).astype(np.float32)
            x[0, 40:72] *= 300  # an outlier block inside a group
            outs = []
            for threads in (1, 2):
                kern.set_threads(threads)
                y = kern.matmul(x[:1], t, qd8=True)
                check_qd8(kern, t, x[:1], y)
                outs.append(y)
            np.testing.assert_array_equal(outs[0], outs[1])
            pair = kern.matmul(x, t, qd8=True)[:1]  # the NX = 2 tile, blocks in another order
            np.testing.assert_allclose(outs[0], pair, rtol=2e-5, atol=1e-5 * float(np.abs(pair).max()))
    finally:
        kern.set_threads(before)


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_qd8_agrees_across_isas(scheme):
    """The quantized activations are bitwise equal on every ISA; the results differ only by
    the float accumulation order, so any two builds agree within twice bound (a)."""
    isas = native.available_isas()
    cols = 640 if scheme != "int4-b128" else 768
    t = qtensor(scheme, 67, cols)
    x = np.random.default_rng(12).standard_normal((5, cols)).astype(np.float32)
    ys = {isa: native.kernels(isa).matmul(x, t, qd8=True) for isa in isas}
    for isa, y in ys.items():
        check_qd8(native.kernels(isa), t, x, y)
    W = t.dequantize().astype(np.float64)
    xh = qd8_activations(x)
    u = 2.0**-24
    m = cols // 8 + 48
    tol = 2 * m * u / (1 - m * u) * (np.abs(xh) @ np.abs(W).T) + 1e-30
    base = ys[isas[-1]]
    for y in ys.values():
        assert np.all(np.abs(y.astype(np.float64) - base) <= tol)


def test_qd8_mode_switch(kern):
    t = qtensor("int4-b32", 17, 640)
    x = np.random.default_rng(13).standard_normal((3, 640)).astype(np.float32)
    exact = kern.matmul(x, t, qd8=False)
    quant = kern.matmul(x, t, qd8=True)
    assert not np.array_equal(exact, quant)
    before = kern.get_qd8()
    try:
        kern.set_qd8(0)
        np.testing.assert_array_equal(kern.matmul(x, t), exact)
        kern.set_qd8(1)
        np.testing.assert_array_equal(kern.matmul(x, t), quant)
        kern.set_qd8("auto")
        assert kern.get_qd8() == -1
        with pytest.raises(ValueError):
            kern.set_qd8(2)
        with pytest.raises(ValueError):
            kern.module.matmul(x, 4, t.parts["q"], t.parts["scale"], 17, 640, np.empty((3, 17), np.float32), 5)
    finally:
        kern.set_qd8(before)
    # fp32/fp16 ignore the flag
    tf = qtensor("fp32", 5, 64)
    xf = np.ones((2, 64), np.float32)
    np.testing.assert_array_equal(kern.matmul(xf, tf, qd8=True), kern.matmul(xf, tf, qd8=False))


@pytest.mark.parametrize("scheme", ["fp32", "fp16"])
def test_float_gemm_against_tiles(kern, scheme):
    """fp32/fp16 products with >= 16 activation rows take the packed outer-product GEMM (every
    build, NEON and scalar included): within the fp32 dot-product bound of the exact product,
    equal to the one-row tiles (the switch at 0) below 16 rows; output columns that are not a
    multiple of 16 (partial panels), K past one 256-wide block and not a multiple of 32, zero
    rows; and the same bits whatever the thread count (the band split)."""
    m = kern.module
    rng = np.random.default_rng(5)
    assert m.get_float_gemm() == 1
    try:
        for cols in (7, 64, 300, 520):
            for rows in (3, 16, 17, 45):
                t = qtensor(scheme, rows, cols)
                for n in (15, 16, 17, 41):
                    x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
                    x[1] = 0
                    m.set_float_gemm(1)
                    y = kern.matmul(x, t)
                    check_matmul(kern, t, x, y, chain=cols + cols // 256 + 2)
                    assert np.all(y[1] == 0)
                    m.set_float_gemm(0)
                    y0 = kern.matmul(x, t)
                    if n < 16:
                        np.testing.assert_array_equal(y, y0)  # the same tiles ran
        m.set_float_gemm(1)
        t = qtensor(scheme, 200, 600)
        x = rng.standard_normal((50, 600)).astype(np.float32)
        kern.set_threads(1)
        y1 = kern.matmul(x, t)
        kern.set_threads(2)
        np.testing.assert_array_equal(kern.matmul(x, t), y1)
    finally:
        m.set_float_gemm(1)
    with pytest.raises(ValueError, match="mode must be 0 or 1"):
        m.set_float_gemm(2)


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_packed_gemm_against_tiles(kern, scheme):
    """Products with >= 16 activation rows take the packed GEMM on builds that have it
    (AVX2, AVX-512). It must meet the qd8 bounds and agree with the one-row tiles (the
    switch set to 0) within float rounding: rows that are not a multiple of 8 (partial
    packed groups), row counts around the threshold, partial int8 blocks, zero rows."""
    m = kern.module
    cols_list = {"int8": [33, 640], "int8-b32": [64, 640], "int4-b32": [64, 640], "int4-b128": [128, 768]}[scheme]
    rng = np.random.default_rng(21)
    assert m.get_packed_gemm() == 1
    try:
        for cols in cols_list:
            for rows in (3, 8, 17, 24, 70, 130):
                t = qtensor(scheme, rows, cols)
                W = t.dequantize().astype(np.float64)
                for n in (15, 16, 17, 40):
                    x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
                    x[1] = 0
                    x[2, : min(cols, 40)] *= 1000
                    m.set_packed_gemm(1)
                    y = kern.matmul(x, t, qd8=True)
                    m.set_packed_gemm(0)
                    y0 = kern.matmul(x, t, qd8=True)
                    check_qd8(kern, t, x, y)
                    # VNNI builds take products of 4-15 rows (int4: 6-15) by the few-row route
                    few = m.vnni_built() and cols % 32 == 0 and (6 if scheme.startswith("int4") else 4) <= n < 16
                    if not m.packed_gemm_built() or (n < 16 and not few):
                        np.testing.assert_array_equal(y, y0)  # the same tiles ran
                        continue
                    u = 2.0**-24
                    k = cols // 8 + 48
                    tol = 2 * k * u / (1 - k * u) * (np.abs(qd8_activations(x)) @ np.abs(W).T) + 1e-30
                    assert np.all(np.abs(y.astype(np.float64) - y0) <= tol), (scheme, cols, rows, n)
                    assert np.all(y[1] == 0)
        # int4 packs 16 weight rows at a time (two groups of 8) and a last group of 8 alone:
        # an output row's value does not depend on which grouping computed it
        if m.packed_gemm_built() and scheme.startswith("int4"):
            cols = cols_list[-1]
            w = rng.standard_normal((24, cols)).astype(np.float32)
            x = rng.standard_normal((20, cols)).astype(np.float32)
            y = kern.matmul(x, quantize(w, scheme), qd8=True)  # rows 0-15: two groups; 16-23: one group
            y2 = kern.matmul(x, quantize(w[8:], scheme), qd8=True)  # rows 8-23 as one pair of groups
            np.testing.assert_array_equal(y[:, 8:], y2)
    finally:
        m.set_packed_gemm(1)
    with pytest.raises(ValueError, match="set_packed_gemm"):
        m.set_packed_gemm(3)
    assert m.packed_gemm_built() == (kern.isa in ("avx2", "avx512", "vnniemu"))
    assert m.vnni_built() == (kern.isa in ("avx512", "vnniemu"))


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_vnni_dot_products_equal_avx2(scheme):
    """The VNNI code paths (vpdpbusd in the avx512 build; exactly emulated in AVX2 by the
    vnniemu test build, so they run on any AVX2 CPU) sum the same int8 x int8 / uint4 x int8
    products in int32 that vpmaddubsw + vpmaddwd sum on AVX2, and everything after the integer
    sums is the same float code: results must be bitwise those of the avx2 build, for the
    GEMV tiles (n = 1..8, decode) and the packed GEMM (n >= 16, prefill) alike."""
    vnni = [i for i in ("vnniemu", "avx512") if native.isa_unavailable_reason(i) is None]
    if native.isa_unavailable_reason("avx2") is not None or not vnni:
        pytest.skip("needs the avx2 build and a VNNI build (vnniemu or avx512) runnable here")
    ref = native.kernels("avx2")
    rng = np.random.default_rng(5)
    cols_list = {"int8": [33, 640], "int8-b32": [64, 1152], "int4-b32": [64, 1152], "int4-b128": [128, 768]}[scheme]
    for cols in cols_list:
        for rows in (1, 7, 40):
            w = rng.standard_normal((rows, cols)).astype(np.float32)
            w[0] = np.where(np.arange(cols) % 2, 1.0, -1.0)  # the extreme codes: |q| at its maximum
            t = quantize(w, scheme)
            for n in (1, 2, 5, 8, 16, 23):
                x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
                x[-1, ::3] *= 1e4  # some activations quantize to +-127, others to 0
                # products of 4-15 rows (int4: 6-15) take the few-row route in VNNI builds, which gives
                # the packed GEMM's bits: the avx2 build's packed GEMM is the reference there
                few = cols % 32 == 0 and (6 if scheme.startswith("int4") else 4) <= n < 16
                ref.module.set_packed_gemm(2 if few else 1)
                try:
                    want = ref.matmul(x, t, qd8=True)
                finally:
                    ref.module.set_packed_gemm(1)
                for isa in vnni:
                    k = native.kernels(isa)
                    assert k.module.vnni_built()
                    got = k.matmul(x, t, qd8=True)
                    np.testing.assert_array_equal(got, want, err_msg=f"{isa} {scheme} {rows}x{cols} n={n}")


@pytest.mark.parametrize("scheme", INT_SCHEMES)
def test_few_row_route(scheme):
    """VNNI builds multiply integer weights with 4-15 activation rows (int4: 6-15; batched
    decode) by the few-row route: activations transposed per block, weights broadcast from
    the bundle layout. It must meet the qd8 bounds and give the packed GEMM's results bit for
    bit (the same integer sums, the same float steps in the same order), in its own build and
    in the avx2 build; in batch-invariant mode it runs from 2 rows, so a row's result does not
    depend on the batch it is in. Row counts around the 4-row groups and the 8/16-row split,
    extreme codes, zero rows, huge activations; int8 per-row with cols % 32 != 0 keeps the
    tiles."""
    vnni = [i for i in ("vnniemu", "avx512") if native.isa_unavailable_reason(i) is None]
    if not vnni:
        pytest.skip("needs a VNNI build (vnniemu or avx512) runnable here")
    others = [native.kernels(i) for i in ("avx2",) if native.isa_unavailable_reason(i) is None]
    rng = np.random.default_rng(11)
    for isa in vnni:
        k = native.kernels(isa)
        m = k.module
        for cols in {"int8": [33, 64, 640, 1152], "int4-b128": [128, 768]}.get(scheme, [64, 640, 1152]):
            for rows in (1, 3, 4, 5, 9, 40):
                w = rng.standard_normal((rows, cols)).astype(np.float32)
                w[0] = np.where(np.arange(cols) % 2, 1.0, -1.0)  # |q| = 127 throughout
                t = quantize(w, scheme)
                for n in (2, 3, 4, 5, 7, 8, 9, 12, 15):
                    x = (rng.standard_normal((n, cols)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
                    x[1] = 0
                    x[-1, ::3] *= 1e4
                    y = k.matmul(x, t, qd8=True)
                    check_qd8(k, t, x, y)
                    assert np.all(y[1] == 0)
                    refs = []  # the packed GEMM's results, this build's and the avx2 build's
                    try:
                        for kk in [k, *others]:
                            kk.module.set_packed_gemm(2)
                            refs.append(kk.matmul(x, t, qd8=True))
                    finally:
                        for kk in [k, *others]:
                            kk.module.set_packed_gemm(1)
                    packed, refs = refs[0], refs[1:]
                    msg = f"{isa} {scheme} {rows}x{cols} n={n}"
                    if n >= (6 if scheme.startswith("int4") else 4) and cols % 32 == 0:
                        np.testing.assert_array_equal(y, packed, err_msg=msg)
                        for r in refs:
                            np.testing.assert_array_equal(y, r, err_msg=msg + " (avx2 packed)")
                    m.set_deterministic(1)
                    try:
                        yd = k.matmul(x, t, qd8=True)
                        row_alone = k.matmul(x[-1:], t, qd8=True)
                    finally:
                        m.set_deterministic(0)
                    np.testing.assert_array_equal(yd, packed, err_msg=msg + " (deterministic)")
                    np.testing.assert_array_equal(yd[-1:], row_alone, err_msg=msg + " (batch-invariant)")


def test_qd8_env_setting():
    import subprocess
    import sys

    code = (
        "from edgelm.backends import native\n"
        "assert native.get_qd8() == 0, native.get_qd8()\n"
        "assert not native.uses_qd8(4, 1) and not native.uses_qd8(2, 64)\n"
    )
    env = dict(__import__("os").environ, EDGELM_QD8="0")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matmul_long_rows(kern, scheme):
    # a longer reduction (and a prime-ish row count) to exercise accumulation error
    cols = 4096 + (0 if SCHEMES[scheme].block > 0 else 13)
    t = qtensor(scheme, 19, cols)
    x = (np.random.default_rng(2).standard_normal((6, cols)) * 3).astype(np.float32)
    check_matmul(kern, t, x, kern.matmul(x, t, qd8=False))
    if SCHEMES[scheme].id >= 2:
        check_qd8(kern, t, x, kern.matmul(x, t, qd8=True))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_embed_matches_reference(kern, scheme):
    rng = np.random.default_rng(3)
    for cols in COLS[scheme]:
        t = qtensor(scheme, 257, cols)
        for dtype in (np.int32, np.int64):
            ids = rng.integers(0, 257, size=11).astype(dtype)
            ids[0], ids[-1] = 0, 256
            got = kern.embed(ids, t)
            assert got.shape == (11, cols) and got.dtype == np.float32
            # same single fp32 rounding (q * scale) as the reference: exact
            np.testing.assert_array_equal(got, t.dequantize_rows(ids))
    assert kern.embed(np.zeros(0, np.int64), t).shape == (0, cols)


def test_embed_many_ids_threads(kern):
    # enough work to take the threaded path
    t = qtensor("int4-b32", 300, 640)
    ids = np.random.default_rng(4).integers(0, 300, size=500)
    kern.set_threads(2)
    np.testing.assert_array_equal(kern.embed(ids, t), t.dequantize_rows(ids))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_threads_give_identical_results(kern, scheme):
    # large enough to be split over several tasks; results must be bitwise identical since
    # each output is computed by exactly one (thread-independent) micro-kernel call
    cols = 640 if SCHEMES[scheme].block != 128 else 768
    t = qtensor(scheme, 1031, cols)
    rng = np.random.default_rng(5)
    for n in (1, 9, 40):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        for qd8 in (False, True):
            kern.set_threads(1)
            assert kern.get_threads() == 1
            y1 = kern.matmul(x, t, qd8=qd8)
            kern.set_threads(2)
            assert kern.get_threads() == 2
            y2 = kern.matmul(x, t, qd8=qd8)
            np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("scheme", ["int8", "int4-b32", "fp16"])
def test_gemv_split_covers_every_row(kern, scheme):
    """One-row products split each thread's range into chunks that idle threads take from
    the back of the others' ranges (GemvSplit): with 3, 5 and 8 threads on this 2-core host
    (so threads are descheduled mid-range and others take over their chunks), every output
    row must be computed exactly once: bitwise the 1-thread results, for matmul, the fused
    q/k/v product and the fused gate/up product, including fewer chunks than threads."""
    blk = SCHEMES[scheme].block or 1
    shapes = [(1031, 640), (7, 16384), (40, 4096)]
    rng = np.random.default_rng(23)
    before = kern.get_threads()
    try:
        for rows, cols in shapes:
            cols = (cols // max(blk, 128)) * max(blk, 128)
            t, t2 = qtensor(scheme, rows, cols, seed=1), qtensor(scheme, rows, cols, seed=2)
            t3 = qtensor(scheme, 3, cols, seed=3)
            x = rng.standard_normal((1, cols)).astype(np.float32)
            res = {}
            for threads in (1, 3, 5, 8):
                kern.set_threads(threads)
                got = []
                for qd8 in (0, 1):
                    got.append(kern.matmul(x, t, qd8=bool(qd8)))
                    outs = [np.full((1, w.rows), np.nan, np.float32) for w in (t, t2, t3)]
                    kern.module.matmul_multi(x, [wargs(w) for w in (t, t2, t3)], outs, qd8)
                    got.extend(outs)
                    out, tmp = np.full((1, rows), np.nan, np.float32), np.full((1, rows), np.nan, np.float32)
                    kern.module.matmul_gelu_mul(x, wargs(t), wargs(t2), out, tmp, qd8)
                    got.extend([out, tmp])
                res[threads] = got
            for threads in (3, 5, 8):
                for a, b in zip(res[1], res[threads]):
                    assert not np.isnan(b).any()
                    np.testing.assert_array_equal(a, b, err_msg=f"{scheme} {rows}x{cols} threads={threads}")
    finally:
        kern.set_threads(before)


def test_pool_oversubscribed_many_small_jobs(kern):
    """More pool threads than cores and thousands of short jobs from several Python threads:
    every result is exact, and no job waits for (or is run by) a worker of another job."""
    import threading

    t = qtensor("int4-b32", 1031, 640)
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((1, 640)).astype(np.float32) for _ in range(8)]
    kern.set_threads(1)
    want = [kern.matmul(x, t) for x in xs]
    kern.set_threads(6)
    errors = []

    def hammer(k):
        for i in range(400):
            j = (i + k) % len(xs)
            if not np.array_equal(kern.matmul(xs[j], t), want[j]):
                errors.append((k, i))

    try:
        ths = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
    finally:
        kern.set_threads(2)
    assert not errors


def test_out_parameter(kern):
    t = qtensor("int8", 17, 100)
    x = np.random.default_rng(6).standard_normal((5, 100)).astype(np.float32)
    out = np.full((5, 17), np.nan, np.float32)
    assert kern.matmul(x, t, out=out) is out
    np.testing.assert_array_equal(out, kern.matmul(x, t))
    # leading dims are flattened
    x3 = x.reshape(5, 1, 100)
    np.testing.assert_array_equal(kern.matmul(x3, t).reshape(5, 17), out)


# ----------------------------------------------------------------------------- bad input


def raw_args(t: QTensor):
    p = t.parts
    return (p["w"], None) if "w" in p else (p["q"], p["scale"])


def test_bad_inputs_raise(kern):
    t = qtensor("int4-b32", 17, 64)
    x = np.ones((3, 64), np.float32)
    with pytest.raises(TypeError, match="float32"):
        kern.matmul(x.astype(np.float64), t)
    with pytest.raises(TypeError, match="float32"):
        kern.matmul(x.astype(np.float16), t)
    with pytest.raises(ValueError, match="shape"):
        kern.matmul(np.ones((3, 63), np.float32), t)
    with pytest.raises(ValueError, match="C-contiguous"):
        kern.matmul(np.ones((64, 3), np.float32).T, t)
    with pytest.raises(ValueError, match="C-contiguous"):
        kern.matmul(np.ones((3, 128), np.float32)[:, ::2], t)
    with pytest.raises(TypeError):
        kern.matmul([[1.0] * 64], t)
    with pytest.raises(ValueError, match="shape"):
        kern.matmul(x, t, out=np.empty((3, 16), np.float32))
    with pytest.raises(TypeError, match="float32"):
        kern.matmul(x, t, out=np.empty((3, 17), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        kern.matmul(x, t, out=np.empty((17, 3), np.float32).T)
    ro = np.empty((3, 17), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        kern.matmul(x, t, out=ro)
    with pytest.raises(ValueError, match="1-D|2-D"):
        kern.matmul(np.ones(4, np.float32), QTensor(SCHEMES["fp32"], (4,), {"w": np.ones(4, np.float32)}))


def test_bad_ids_raise(kern):
    t = qtensor("int8", 17, 33)
    with pytest.raises(ValueError, match=r"id 17 at position 1"):
        kern.embed(np.array([0, 17, 3], np.int32), t)
    with pytest.raises(ValueError, match=r"id -1 at position 0"):
        kern.embed(np.array([-1], np.int64), t)
    with pytest.raises(ValueError, match=r"id 4294967295"):
        kern.embed(np.array([0, 2**32 - 1], np.uint32), t)
    with pytest.raises(ValueError, match=r"id 99"):
        kern.embed(99, t)
    with pytest.raises(TypeError, match="integers"):
        kern.embed(np.array([1.0, 2.0]), t)
    with pytest.raises(ValueError, match="1-D"):
        kern.embed(np.zeros((2, 2), np.int64), t)
    # other integer dtypes and non-contiguous ids are converted
    np.testing.assert_array_equal(kern.embed(np.array([1, 2], np.uint8), t), t.dequantize_rows([1, 2]))
    np.testing.assert_array_equal(kern.embed(np.arange(6)[::2], t), t.dequantize_rows([0, 2, 4]))


def test_raw_module_validates_everything(kern):
    """The C++ entry points check every argument themselves (nothing may reach a kernel unchecked)."""
    m = kern.module
    t = qtensor("int4-b128", 5, 256)
    q, s = raw_args(t)
    x = np.ones((2, 256), np.float32)
    out = np.empty((2, 5), np.float32)
    m.matmul(x, 5, q, s, 5, 256, out)  # the good call
    np.testing.assert_allclose(out, kern.matmul(x, t), rtol=0, atol=0)

    bad = [
        ((x, 6, q, s, 5, 256, out), ValueError, "unknown scheme"),
        ((x, -1, q, s, 5, 256, out), ValueError, "unknown scheme"),
        ((x, 5, q, s, 0, 256, out), ValueError, "rows and cols"),
        ((x, 5, q, s, 5, 200, out), ValueError, "multiple of 128"),
        ((x, 5, q, s, 6, 256, out), ValueError, "shape"),
        ((x, 5, q, s, 5, 512, np.empty((2, 5), np.float32)), ValueError, "shape"),
        ((x, 5, q.view(np.int8), s, 5, 256, out), TypeError, "uint8"),
        ((x, 5, q, s.astype(np.float32), 5, 256, out), TypeError, "float16"),
        ((x, 5, q, None, 5, 256, out), TypeError, "numpy array"),
        ((x, 5, q[:, ::2], s, 5, 256, out), ValueError, "shape|C-contiguous"),
        ((x, 5, q.tolist(), s, 5, 256, out), TypeError, "numpy array"),
        ((x, 4, q, s, 5, 256, out), ValueError, "shape"),  # int4-b32 wants 8 scales per row
        ((x, 0, q, s, 5, 256, out), TypeError, "float32"),
        ((x.astype(">f4"), 5, q, s, 5, 256, out), TypeError, "float32"),
        ((x, 5, q, s, 5, 256, x), ValueError, "shape"),
        ((x, 5, q, s, 5, 256, out.tolist()), TypeError, "numpy array"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            m.matmul(*args)

    # fp32 takes no scale; out must not alias the input
    w = np.ones((4, 8), np.float32)
    xx = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="no scale"):
        m.matmul(xx, 0, w, np.ones(4, np.float32), 4, 8, np.empty((4, 4), np.float32))
    buf = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        m.matmul(buf, 0, w, None, 4, 8, buf.reshape(-1)[:16].reshape(4, 4))
    # misaligned float32 data
    raw = np.zeros(4 * 8 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(4, 8)
    with pytest.raises(ValueError, match="aligned"):
        m.matmul(raw, 0, w, None, 4, 8, np.empty((4, 4), np.float32))

    # embed
    e_out = np.empty((2, 256), np.float32)
    with pytest.raises(ValueError, match="id 5 at position 1"):
        m.embed(np.array([0, 5], np.int64), 5, q, s, 5, 256, e_out)
    with pytest.raises(TypeError, match="int32 or int64"):
        m.embed(np.array([0, 1], np.int16), 5, q, s, 5, 256, e_out)
    with pytest.raises(ValueError, match="C-contiguous"):
        m.embed(np.arange(4, dtype=np.int64)[::2], 5, q, s, 5, 256, e_out)
    with pytest.raises(ValueError, match="shape"):
        m.embed(np.array([0, 1, 2], np.int64), 5, q, s, 5, 256, e_out)
    with pytest.raises(ValueError):
        m.set_threads(0)


def test_set_threads_validates(kern):
    with pytest.raises(ValueError):
        kern.set_threads(0)
    with pytest.raises(TypeError):
        kern.set_threads(1.5)


def test_module_api():
    assert native.ISA in native.available_isas()
    assert native.default_threads() >= 1
    assert native.get_threads() >= 1
    t = qtensor("int8-b32", 3, 64)
    x = np.ones(64, np.float32)
    np.testing.assert_allclose(native.matmul(x, t), t.dequantize() @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(native.embed([2, 0], t), t.dequantize_rows([2, 0]))
    with pytest.raises(RuntimeError, match="unknown ISA"):
        native.kernels("sse9")
    for isa in native.ALL_ISAS:
        if not native.cpu_supports(isa):
            with pytest.raises(RuntimeError, match="lacks|does not exist"):
                native.kernels(isa)


def test_fp16_every_bit_pattern(kern):
    # all 65536 halves (subnormals, +-0, +-inf, nans) through the weight path of embed
    bits = np.arange(65536, dtype=np.uint16).reshape(64, 1024)
    t = QTensor(SCHEMES["fp16"], (64, 1024), {"w": bits.view(np.float16)})
    got = kern.embed(np.arange(64), t)
    np.testing.assert_array_equal(got, bits.view(np.float16).astype(np.float32))  # nan == nan here
    assert np.array_equal(np.signbit(got), np.signbit(bits.view(np.float16).astype(np.float32)))


def test_concurrent_callers(kern):
    # several Python threads calling at once (the GIL is released; jobs queue on the pool)
    import threading

    t = qtensor("int8-b32", 1031, 640)
    x = np.random.default_rng(7).standard_normal((3, 640)).astype(np.float32)
    kern.set_threads(2)
    want = kern.matmul(x, t)
    errors = []

    def worker():
        for _ in range(20):
            if not np.array_equal(kern.matmul(x, t), want):
                errors.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_pool_survives_fork(kern):
    import os
    import warnings

    t = qtensor("int4-b32", 1031, 640)
    x = np.random.default_rng(8).standard_normal((2, 640)).astype(np.float32)
    kern.set_threads(2)
    want = kern.matmul(x, t)  # workers exist now
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: the parent's workers are gone; the pool must start fresh ones
        ok = False
        try:
            ok = np.array_equal(kern.matmul(x, t), want) and kern.get_threads() == 2
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    np.testing.assert_array_equal(kern.matmul(x, t), want)


def test_import_without_extension_does_not_raise():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('edgelm._native._kern'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edgelm.backends import native\n"
        "assert not native.available() and native.ISA == 'none'\n"
        "assert 'blocked for the test' in native.unavailable_reason()\n"
        "try:\n"
        "    native.set_threads(1)\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e)\n"
        "else:\n"
        "    raise AssertionError('set_threads should raise')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ fused products (fused.h)

def wargs(t: QTensor):
    """A weight as the fused entry points take it: (scheme_id, w, scale, rows, cols)."""
    return (t.scheme.id, *raw_args(t), t.rows, t.cols)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matmul_multi_equals_separate_products(kern, scheme, n):
    """q, k, v in one job: bitwise the separate matmuls (same qd8 choice), odd sizes too."""
    cols = 640 if SCHEMES[scheme].block != 128 else 768
    ts = [qtensor(scheme, r, cols, seed=r) for r in (1024, 256, 77)]
    x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
    for qd8 in (0, 1):
        outs = [np.full((n, t.rows), np.nan, np.float32) for t in ts]
        kern.module.matmul_multi(x, [wargs(t) for t in ts], outs, qd8)
        for t, o in zip(ts, outs):
            np.testing.assert_array_equal(o, kern.matmul(x, t, qd8=bool(qd8)))


def test_matmul_multi_mixed_schemes(kern):
    ts = [qtensor("int4-b32", 64, 640), qtensor("int8", 32, 640), qtensor("fp16", 16, 640)]
    x = np.random.default_rng(3).standard_normal((2, 640)).astype(np.float32)
    outs = [np.empty((2, t.rows), np.float32) for t in ts]
    kern.module.matmul_multi(x, [wargs(t) for t in ts], outs, -1)
    for t, o in zip(ts, outs):
        np.testing.assert_array_equal(o, kern.matmul(x, t))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_gelu_mul_equals_unfused(kern, scheme, n):
    cols = 640 if SCHEMES[scheme].block != 128 else 768
    g, u = qtensor(scheme, 2048, cols, seed=1), qtensor(scheme, 2048, cols, seed=2)
    x = np.random.default_rng(n).standard_normal((n, cols)).astype(np.float32)
    for qd8 in (0, 1):
        out, tmp = np.empty((n, 2048), np.float32), np.empty((n, 2048), np.float32)
        kern.module.matmul_gelu_mul(x, wargs(g), wargs(u), out, tmp, qd8)
        gm, um = kern.matmul(x, g, qd8=bool(qd8)), kern.matmul(x, u, qd8=bool(qd8))
        np.testing.assert_array_equal(tmp, um)
        ref = NumpyOps().gelu_mul(gm, um)
        assert np.all(np.abs(out - ref) <= 2e-6 * (np.abs(gm * um) + np.abs(ref)) + 1e-30)


def test_tower_elementwise_against_numpy(kern):
    """The towers' fused elementwise kernels: RMSNorm followed by GELU (the image tower's
    norm + activation pairs) and x * sigmoid(g) (the audio tower's SiLU and GLU gates), against
    the numpy reference at the vector tanh's bound, on row lengths off the 8-lane width; bad
    arguments are errors."""
    from edgelm.backends.numpy_ops import NumpyOps

    ref, rng = NumpyOps(), np.random.default_rng(11)
    for n, d in ((1, 1), (3, 7), (5, 64), (9, 131)):
        x = (rng.standard_normal((n, d)) * 3).astype(np.float32)
        w = rng.standard_normal(d).astype(np.float32)
        normed = ref.rmsnorm(x, w, 1e-6)
        got, want = kern.rmsnorm(x, w, 1e-6, act=1), ref.rmsnorm(x, w, 1e-6, act="gelu")
        assert np.all(np.abs(got - want) <= 2e-6 * np.abs(normed) + 1e-5 * np.abs(want) + 1e-7)
        np.testing.assert_array_equal(kern.rmsnorm(x, w, 1e-6, act=0), kern.rmsnorm(x, w, 1e-6))
        g = (rng.standard_normal((n, d)) * 8).astype(np.float32)
        for gate in (g, x):  # a GLU's gate, SiLU
            got, want = kern.sigmoid_mul(x, gate), ref.sigmoid_mul(x, gate)  # sigmoid = (1 + tanh(g/2)) / 2
            assert np.all(np.abs(got - want) <= 2e-7 * np.abs(x) + 2e-6 * np.abs(want))
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="act must be"):
        kern.rmsnorm(x, np.ones(8, np.float32), 1e-6, act=2)
    with pytest.raises(ValueError, match="act must be"):
        ref.rmsnorm(x, np.ones(8, np.float32), 1e-6, act="relu")
    with pytest.raises(ValueError):
        kern.sigmoid_mul(x, np.ones((2, 7), np.float32))


def test_full_attention_against_numpy(kern):
    """Attention in which every query sees every key (the image tower's multi-query attention):
    one and several kv heads, head dims and key counts off the 16-wide panels, a single key,
    against the numpy reference (the masked kernel with every position 0); the thread count
    changes no bit; bad shapes are errors."""
    from edgelm.backends.numpy_ops import NumpyOps

    ref, rng = NumpyOps(), np.random.default_rng(12)
    for n, H, KV, hd, T in ((1, 1, 1, 1, 1), (7, 3, 1, 20, 13), (50, 12, 1, 64, 37), (33, 4, 2, 96, 100),
                            (9, 16, 1, 96, 70)):
        q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((n, H, hd), (T, KV, hd), (T, KV, hd)))
        want = ref.full_attention(q, k, v, 0.3)
        kern.set_threads(1)
        got = kern.full_attention(q, k, v, 0.3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
        kern.set_threads(2)
        np.testing.assert_array_equal(kern.full_attention(q, k, v, 0.3), got)
    q, k = np.ones((2, 4, 8), np.float32), np.ones((5, 1, 8), np.float32)
    for args, msg in (((q, np.ones((5, 1, 7), np.float32), k), "head_dim"),
                      ((q, np.ones((5, 3, 8), np.float32), np.ones((5, 3, 8), np.float32)), "do not group"),
                      ((q, k, np.ones((4, 1, 8), np.float32)), "v"),
                      ((q[0], k, k), "q must have shape")):
        with pytest.raises(ValueError, match=msg):
            kern.full_attention(*args, 1.0)


def test_fused_products_validate(kern):
    m = kern.module
    a, b = qtensor("int8", 32, 640), qtensor("int8", 32, 320)
    x = np.zeros((2, 640), np.float32)
    o = np.empty((2, 32), np.float32)
    with pytest.raises(ValueError, match="same cols"):
        m.matmul_multi(x, [wargs(a), wargs(b)], [o, np.empty((2, 32), np.float32)])
    with pytest.raises(ValueError, match="one out array per weight"):
        m.matmul_multi(x, [wargs(a)], [o, o])
    with pytest.raises(ValueError, match="overlap"):
        m.matmul_multi(x, [wargs(a), wargs(a)], [o, o])
    with pytest.raises(ValueError, match="1 to 8 weights"):
        m.matmul_multi(x, [], [])
    with pytest.raises(ValueError, match=r"\(scheme_id, w, scale, rows, cols\)"):
        m.matmul_multi(x, [(2, None)], [o])
    with pytest.raises(ValueError, match="shape"):
        m.matmul_multi(np.zeros((2, 100), np.float32), [wargs(a)], [o])
    with pytest.raises(ValueError, match="same shape"):
        m.matmul_gelu_mul(x, wargs(a), wargs(qtensor("int8", 16, 640)), o, o.copy())
    with pytest.raises(ValueError, match="overlap"):
        m.matmul_gelu_mul(x, wargs(a), wargs(a), o, o)
    bad = wargs(a)
    with pytest.raises(ValueError):
        m.matmul_gelu_mul(x, (bad[0], bad[1], bad[2], 64, 640), wargs(a), o, o.copy())


def test_cpu_ops_fused_products_match_numpy_reference():
    """CpuOps.matmul_multi / matmul_gelu_mul against NumpyOps (the reference op table)."""
    from edgelm.backends.cpu import CpuOps

    ops, ref = CpuOps(), NumpyOps()
    ts = [qtensor("fp32", 96, 640, seed=s) for s in (1, 2, 3)]
    x = np.random.default_rng(0).standard_normal((4, 640)).astype(np.float32)
    for got, want in zip(ops.matmul_multi(x, ts), ref.matmul_multi(x, ts)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    got, want = ops.matmul_gelu_mul(x, ts[0], ts[1]), ref.matmul_gelu_mul(x, ts[0], ts[1])
    # fp32 sums in another order (~1e-5 relative in g and u), carried through gelu(g) * u
    g, u = np.abs(ref.matmul(x, ts[0])), np.abs(ref.matmul(x, ts[1]))
    assert np.all(np.abs(got - want) <= 1e-4 * (g + u + np.abs(want)) + 1e-4)


def test_depthwise_conv2d_against_numpy(kern):
    """The image tower's depthwise convolution: every stride and padding MobileNet-V5 uses, odd
    sizes, channel counts off the 8-lane width, against the numpy reference (tap by tap in the
    same order); the thread count changes no bit; bad shapes are errors, never a crash."""
    from edgelm.backends.numpy_ops import NumpyOps

    ref = NumpyOps()
    rng = np.random.default_rng(9)
    for (H, W, C, k, s, top, left) in ((7, 9, 20, 3, 2, 0, 0), (7, 9, 20, 3, 2, 1, 1), (16, 16, 64, 5, 1, 2, 2),
                                       (15, 11, 3, 5, 2, 1, 2), (1, 1, 8, 3, 1, 1, 1), (33, 17, 13, 3, 2, 0, 1)):
        x = rng.standard_normal((H, W, C)).astype(np.float32)
        t = rng.standard_normal((k, k, C)).astype(np.float32)
        oh, ow = -(-(H + top) // s), -(-(W + left) // s)
        oh, ow = min(oh, (H - 1 + top) // s + 1), min(ow, (W - 1 + left) // s + 1)
        want = ref.depthwise_conv2d(x, t, s, top, left, (oh, ow))
        kern.set_threads(1)
        got = kern.depthwise_conv2d(x, t, s, top, left, (oh, ow))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * k * k)
        kern.set_threads(2)
        np.testing.assert_array_equal(kern.depthwise_conv2d(x, t, s, top, left, (oh, ow)), got)
    x = np.ones((4, 4, 8), np.float32)
    for args, msg in (((np.ones((3, 3, 7), np.float32), 1, 1, 1, (4, 4)), "taps must be"),
                      ((np.ones((3, 3, 8), np.float32), 0, 1, 1, (4, 4)), "stride"),
                      ((np.ones((3, 3, 8), np.float32), 1, 3, 1, (4, 4)), "top, left"),
                      ((np.ones((3, 3, 8), np.float32), 1, 1, 1, (9, 4)), "larger than the input")):
        with pytest.raises(ValueError, match=msg):
            kern.depthwise_conv2d(x, *args)
