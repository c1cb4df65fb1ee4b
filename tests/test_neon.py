"""The NEON build's kernels (aarch64), on an x86-64 host: tests/native/harness.cpp, a
stand-alone driver of the kernel headers, is cross-compiled with aarch64-linux-gnu-g++ (so
simd.h takes its NEON path) and run under qemu-user. Every kernel gets the same reference
checks as the native builds get in test_kernels.py / test_ops.py: the matmul of every scheme
with fp32 and with qd8 activations, embedding rows, attention over fp32 and fp16 caches, and
the fused elementwise ops, on odd shapes and with 2 threads.

test.sh installs the two tools with apt where it can (Debian: g++-aarch64-linux-gnu,
qemu-user); without them these tests skip and say why. On an aarch64 host the NEON build is
the native one and test_kernels.py / test_ops.py run it directly.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgelm.backends.numpy_ops import NumpyOps
from edgelm.quant.schemes import SCHEMES

from .test_kernels import check_matmul, check_qd8, qtensor
from .test_ops import check_attention

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "native" / "harness.cpp"
HEADERS = sorted((ROOT / "edgelm" / "_native").glob("*.h"))
REF = NumpyOps()
OP = {"matmul": 1, "matmul_qd8": 2, "attention": 3, "rmsnorm": 4, "gelu_mul": 5, "softcap": 6, "embed": 7, "rope": 8,
      "depthwise_conv2d": 9, "full_attention": 10, "sigmoid_mul": 11, "rmsnorm_gelu": 12}


def _tools() -> tuple[str, str] | None:
    cxx = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    return (cxx, qemu) if cxx and qemu else None


@pytest.fixture(scope="module")
def neon(tmp_path_factory):
    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("an aarch64 host runs the NEON build natively (test_kernels.py, test_ops.py)")
    tools = _tools()
    if tools is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: g++-aarch64-linux-gnu qemu-user)")
    cxx, qemu = tools
    h = hashlib.sha256()
    for p in [HARNESS, *HEADERS]:
        h.update(p.read_bytes())
    cache = Path(os.environ.get("EDGELM_CACHE", Path.home() / ".cache" / "edgelm")) / "neon-harness"
    exe = cache / f"harness-{h.hexdigest()[:16]}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        r = subprocess.run([cxx, "-O2", "-std=c++17", "-static", "-pthread", "-Wall", str(HARNESS), "-o", str(tmp)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        tmp.replace(exe)
    return Neon(qemu, exe, tmp_path_factory.mktemp("neon"))


class Neon:
    """Runs batches of kernel calls in the aarch64 harness under qemu."""

    isa = "neon (qemu)"

    def __init__(self, qemu: str, exe: Path, tmp: Path):
        self.qemu, self.exe, self.tmp = qemu, exe, tmp
        self.cases: list[bytes] = []

    def add(self, op: str, hdr, *arrays) -> int:
        h = list(hdr) + [0] * (8 - len(hdr))
        rec = [struct.pack("<q", OP[op]), struct.pack("<8q", *h), struct.pack("<q", len(arrays))]
        for a in arrays:
            b = np.ascontiguousarray(a).tobytes() if a is not None else b""
            rec += [struct.pack("<q", len(b)), b]
        self.cases.append(b"".join(rec))
        return len(self.cases) - 1

    def run(self) -> list[np.ndarray]:
        src, dst = self.tmp / "in.bin", self.tmp / "out.bin"
        src.write_bytes(b"".join(self.cases))
        self.cases = []
        r = subprocess.run([self.qemu, str(self.exe), str(src), str(dst), "2"], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr
        data, outs, off = dst.read_bytes(), [], 0
        while off < len(data):
            (nb,) = struct.unpack_from("<q", data, off)
            outs.append(np.frombuffer(data, np.float32, nb // 4, off + 8).copy())
            off += 8 + nb
        return outs


def _weight_parts(t):
    w = t.parts.get("q", t.parts.get("w"))
    return w, t.parts.get("scale")


def test_neon_matmul_every_scheme(neon):
    """fp32 activations (the NEON default) and qd8 (the portable integer code), all schemes."""
    rng = np.random.default_rng(11)
    cols_of = {"fp32": [7, 100, 640], "fp16": [7, 100, 640], "int8": [7, 33, 640], "int8-b32": [32, 96, 640],
               "int4-b32": [32, 96, 640], "int4-b128": [128, 384]}
    jobs = []
    for scheme, cols_list in cols_of.items():
        for cols in cols_list:
            for rows in (1, 17, 257):
                t = qtensor(scheme, rows, cols)
                w, s = _weight_parts(t)
                for n in (1, 3, 9, 33):
                    x = rng.standard_normal((n, cols)).astype(np.float32)
                    sid = SCHEMES[scheme].id
                    jobs.append(("f", t, x, neon.add("matmul", (sid, rows, cols, n), w, s, x)))
                    if scheme.startswith("int"):
                        jobs.append(("q", t, x, neon.add("matmul_qd8", (sid, rows, cols, n), w, s, x)))
    outs = neon.run()
    assert len(outs) == len(jobs)
    for kind, t, x, i in jobs:
        y = outs[i].reshape(x.shape[0], t.rows)
        if kind == "q":
            check_qd8(neon, t, x, y)
        elif t.scheme.name in ("fp32", "fp16") and x.shape[0] >= 16:  # the float GEMM sums over k in sequence
            check_matmul(neon, t, x, y, chain=t.cols + t.cols // 256 + 2)
        else:
            check_matmul(neon, t, x, y)


def test_neon_embed(neon):
    jobs = []
    for scheme in SCHEMES:
        cols = 256
        t = qtensor(scheme, 40, cols)
        w, s = _weight_parts(t)
        ids = np.array([0, 39, 7, 7, 21], np.int64)
        jobs.append((t, ids, neon.add("embed", (SCHEMES[scheme].id, 40, cols, len(ids)), w, s, ids)))
    outs = neon.run()
    for t, ids, i in jobs:
        np.testing.assert_array_equal(outs[i].reshape(len(ids), t.cols), t.dequantize_rows(ids))


class _AttnAdapter:
    """check_attention() calls ops.attention(...); this one answers from a finished batch."""

    def __init__(self, y):
        self.y = y

    def attention(self, q, *_):
        return self.y.reshape(q.shape[0], -1)


def test_neon_attention(neon):
    cases = [  # n, T, H, KV, hd, window, cap
        (1, 70, 4, 1, 256, 0, 0.0),
        (1, 700, 4, 1, 256, 512, 0.0),   # decode: split over keys, sliding window
        (1, 600, 8, 2, 64, 0, 20.0),
        (3, 40, 4, 2, 13, 0, 0.0),       # odd head_dim
        (17, 17, 4, 1, 256, 0, 0.0),     # prefill from an empty cache
        (70, 150, 8, 2, 64, 50, 20.0),
        (5, 9, 1, 1, 8, 3, 0.0),
    ]
    rng = np.random.default_rng(12)
    jobs = []
    for n, T, H, KV, hd, window, cap in cases:
        q = rng.standard_normal((n, H, hd)).astype(np.float32)
        kv = [rng.standard_normal((T, KV, hd)).astype(np.float32) for _ in range(2)]
        kpos = np.arange(T, dtype=np.int64)
        kpos[T // 3] = -1  # an empty slot
        qpos = np.arange(T - n, T, dtype=np.int64)
        scale = np.float32(hd ** -0.5)
        for half in (0, 1):
            k, v = (a.astype(np.float16) for a in kv) if half else kv
            i = neon.add("attention", (n, H, KV, hd, T, window, half), q, k, v, qpos, kpos,
                         np.array([scale, cap], np.float32))
            jobs.append((q, k, v, qpos, kpos, window, scale, cap or None, i))
    outs = neon.run()
    for q, k, v, qpos, kpos, window, scale, cap, i in jobs:
        k32, v32 = k.astype(np.float32), v.astype(np.float32)
        check_attention(_AttnAdapter(outs[i]), q, k32, v32, qpos, kpos, window, scale, cap)


def test_neon_elementwise(neon):
    """rmsnorm, rope, gelu_mul and softcap with test_ops.py's bounds (see its docstring)."""
    rng = np.random.default_rng(13)
    jobs = []
    for rows, d in ((1, 7), (3, 640), (513, 256)):
        x = (rng.standard_normal((rows, d)) * 3).astype(np.float32)
        w = (1 + rng.standard_normal(d)).astype(np.float32)
        jobs.append(("rmsnorm", (x, w), neon.add("rmsnorm", (rows, d), x, w, np.array([1e-6], np.float32))))
    for n, heads, hd in ((1, 4, 256), (7, 1, 2), (5, 3, 18), (33, 4, 64)):
        x = rng.standard_normal((n, heads, hd)).astype(np.float32)
        pos = np.sort(rng.integers(0, 5000, n)).astype(np.int64)
        inv = (1.0 / (10_000.0 ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
        ang = pos.astype(np.float32)[:, None] * inv[None, :]
        jobs.append(("rope", (x, pos), neon.add("rope", (n, heads, hd), x, np.cos(ang), np.sin(ang))))
    for size in (1, 7, 1000, 4099):
        g = (rng.standard_normal(size) * 4).astype(np.float32)
        u = rng.standard_normal(size).astype(np.float32)
        jobs.append(("gelu_mul", (g, u), neon.add("gelu_mul", (size,), g, u)))
        jobs.append(("softcap", (g * 10,), neon.add("softcap", (size,), g * 10, np.array([30.0], np.float32))))
    outs = neon.run()
    for op, args, i in jobs:
        if op == "rmsnorm":
            x, w = args
            y, ref = outs[i].reshape(x.shape), REF.rmsnorm(x, w, 1e-6)
            assert np.all(np.abs(y - ref) <= 1e-5 * np.abs(ref) + 1e-7 * np.abs(x) * np.abs(w) + 1e-30), op
        elif op == "rope":
            x, pos = args
            y, ref = outs[i].reshape(x.shape), REF.rope(x, pos, 10_000.0, 1.0)
            half = x.shape[-1] // 2
            mag = np.concatenate([np.abs(x[..., :half]) + np.abs(x[..., half:])] * 2, axis=-1)
            assert np.all(np.abs(y - ref) <= 1e-6 * mag + 1e-30), op
        elif op == "gelu_mul":
            g, u = args
            y, ref = outs[i], REF.gelu_mul(g, u)
            assert np.all(np.abs(y - ref) <= 2e-6 * (np.abs(g * u) + np.abs(ref)) + 1e-30), op
        else:
            (x,) = args
            assert np.all(np.abs(outs[i] - REF.softcap(x, 30.0)) <= 2e-6 * 30.0), op


def test_neon_harness_rejects_a_bad_batch(neon):
    """The harness checks every byte count against its op's shape before a kernel runs."""
    x = np.ones(10, np.float32)
    neon.add("softcap", (11,), x, np.array([3.0], np.float32))  # 11 values promised, 10 given
    with pytest.raises(AssertionError, match="wrong byte count for x"):
        neon.run()


def test_neon_depthwise_conv2d(neon):
    """The image tower's depthwise convolution (8-lane channel groups plus a scalar tail)
    against the numpy reference, strides 1 and 2, padding on either side."""
    from edgelm.backends.numpy_ops import NumpyOps

    ref = NumpyOps()
    rng = np.random.default_rng(3)
    jobs = []
    for (H, W, C, k, s, top, left, oh, ow) in ((7, 9, 20, 3, 2, 1, 1, 4, 5), (16, 16, 64, 5, 1, 2, 2, 16, 16),
                                                (15, 11, 3, 5, 2, 1, 2, 8, 6), (1, 1, 8, 3, 1, 1, 1, 1, 1)):
        x = rng.standard_normal((H, W, C)).astype(np.float32)
        t = rng.standard_normal((k, k, C)).astype(np.float32)
        i = neon.add("depthwise_conv2d", (H, W, C, k, s, top, left, oh), x, t, np.array([ow], np.int64))
        jobs.append((i, ref.depthwise_conv2d(x, t, s, top, left, (oh, ow))))
    outs = neon.run()
    for i, want in jobs:
        np.testing.assert_allclose(outs[i].reshape(want.shape), want, rtol=1e-5, atol=1e-5 * 25)


def test_neon_tower_kernels(neon):
    """The towers' full attention (every query sees every key), x * sigmoid(g) and RMSNorm +
    GELU against the numpy reference."""
    rng = np.random.default_rng(4)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    jobs = []
    for n, H, KV, hd, T in ((7, 3, 1, 20, 13), (9, 4, 2, 96, 37)):
        q, k, v = f(n, H, hd), f(T, KV, hd), f(T, KV, hd)
        i = neon.add("full_attention", (n, H, KV, hd, T), q, k, v, np.array([0.3], np.float32))
        jobs.append((i, REF.full_attention(q, k, v, 0.3), 1e-5))
    x, g = f(5, 37) * 3, f(5, 37) * 8
    jobs.append((neon.add("sigmoid_mul", (x.size,), x, g), REF.sigmoid_mul(x, g), 2e-6))
    w = f(37)
    jobs.append((neon.add("rmsnorm_gelu", (5, 37), x, w, np.array([1e-6], np.float32)),
                 REF.rmsnorm(x, w, 1e-6, act="gelu"), 2e-5))
    outs = neon.run()
    for i, want, tol in jobs:
        np.testing.assert_allclose(outs[i].reshape(want.shape), want, rtol=tol, atol=tol * np.abs(want).max())
