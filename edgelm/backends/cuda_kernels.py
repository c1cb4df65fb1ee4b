"""Triton kernels of the CUDA backend (backends/cuda.py), with their launch functions.

Every kernel also runs under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which
is how the test suite proves them without a GPU, and benchmarks/cuda_aot.py compiles them
for sm_90 without one. Activations are fp32 and every sum accumulates in fp32; quantized
weights are read in their stored layout (quant/schemes.py) and dequantized in registers,
never into a float copy. Products use tensor cores through `tl.dot` (TF32 on the GPU) from
5 activation rows up (padded to 16), and below that a reduction over the row (no tensor
cores: one pass over the weights, which is all decode needs). Attention over an fp16 cache
takes fp16 dot operands.

Scheme ids are those of quant/schemes.py: 0 fp32, 1 fp16, 2 int8 (per row), 3 int8-b32,
4 int4-b32, 5 int4-b128.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it when the kernels are defined


# ----------------------------------------------------------------------------- weights

@triton.jit
def _load_w(q_ptr, s_ptr, rn, rk, N, K, SCHEME: tl.constexpr, BS: tl.constexpr):
    """The weights W[rn, rk] as fp32 [len(rn), len(rk)], dequantized from the stored parts
    (rows past N and columns past K read zero)."""
    m = (rn < N)[:, None] & (rk < K)[None, :]
    if SCHEME == 0:
        w = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0.0)
    elif SCHEME == 1:
        w = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0.0).to(tl.float32)
    elif SCHEME == 2:
        q = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
        w = q * s[:, None]
    elif SCHEME == 3:
        q = tl.load(q_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + rn[:, None].to(tl.int64) * (K // 32) + (rk // 32)[None, :], mask=m, other=0.0)
        w = q * s.to(tl.float32)
    else:
        # Q4_0 order: within each run of 32 weights, byte j holds weight j (low nibble) and
        # weight j + 16 (high nibble).
        byte = (rk // 32) * 16 + (rk % 16)
        b = tl.load(q_ptr + rn[:, None].to(tl.int64) * (K // 2) + byte[None, :], mask=m, other=0).to(tl.int32)
        nib = (b >> (((rk // 16) % 2) * 4)[None, :]) & 0xF
        s = tl.load(s_ptr + rn[:, None].to(tl.int64) * (K // BS) + (rk // BS)[None, :], mask=m, other=0.0)
        w = (nib - 8).to(tl.float32) * s.to(tl.float32)
    return w


@triton.jit
def _gelu(g):
    # tanh GELU, as the numpy reference; tanh(z) = 1 - 2 / (exp(2z) + 1)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    return 0.5 * g * (1.0 + t)


@triton.jit
def _mac(acc, x, w, DOT: tl.constexpr):
    """acc + x @ w.T: a tensor-core tile ([BM, BN] acc), or products kept per column
    ([BM, BN, BK] acc, reduced once after the loop)."""
    if DOT:
        r = acc + tl.dot(x, tl.trans(w))
    else:
        r = acc + x[:, None, :] * w[None, :, :]
    return r


@triton.jit
def _qmm_kernel(x_ptr, q_ptr, s_ptr, q2_ptr, s2_ptr, out_ptr, M, N, K, sxm, som,
                SCHEME: tl.constexpr, BS: tl.constexpr, DUAL: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """out[M, N] = x[M, K] @ W.T, or with DUAL gelu(x @ W.T) * (x @ W2.T) (GeGLU)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    if DOT:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN, BK), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :],
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        acc = _mac(acc, x, _load_w(q_ptr, s_ptr, rn, rk, N, K, SCHEME, BS), DOT)
        if DUAL:
            acc2 = _mac(acc2, x, _load_w(q2_ptr, s2_ptr, rn, rk, N, K, SCHEME, BS), DOT)
    if DOT:
        r = acc
        r2 = acc2
    else:
        r = tl.sum(acc, axis=2)
        r2 = tl.sum(acc2, axis=2)
    if DUAL:
        r = _gelu(r) * r2
    tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :], r, mask=(rm < M)[:, None] & (rn < N)[None, :])


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def _tuned(fn, configs, key, interp):
    """`fn` autotuned over `configs` on the device (the fastest config per key, measured at the
    first launch of each key; kept on disk where this Triton can). The interpreter takes
    `interp`, one config with few, large programs: it measures nothing, and its cost is per
    program."""
    if INTERPRET:
        configs = [interp]
    kw = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **kw)(fn)


# Tile configs. Which is fastest depends on the card and the shape, and no GPU has measured
# them yet: the device picks. Every config is compiled for sm_90 by benchmarks/cuda_aot.py
# (tests/test_cuda_backend.py: no spills, shared memory within the H100's 227 KiB).
# Decode (1-4 rows): a program reduces BN weight rows over the whole row, BK at a time;
# small BN keeps enough programs for 132 SMs on the narrow products (k/v: 256 rows).
GEMV_CONFIGS = [triton.Config({"BN": 16, "BK": 128}, num_warps=4),
                triton.Config({"BN": 8, "BK": 256}, num_warps=4),
                triton.Config({"BN": 32, "BK": 64}, num_warps=4),
                triton.Config({"BN": 4, "BK": 256}, num_warps=2)]
# Prefill (5+ rows): tl.dot tiles, BM rows chosen by the launcher.
DOT_CONFIGS = [triton.Config({"BN": 64, "BK": 32}, num_warps=4, num_stages=3),
               triton.Config({"BN": 64, "BK": 32}, num_warps=8, num_stages=3),
               triton.Config({"BN": 128, "BK": 32}, num_warps=8, num_stages=3),
               triton.Config({"BN": 64, "BK": 64}, num_warps=4, num_stages=2)]
_MM_KEY = ["N", "K", "SCHEME", "DUAL", "BM"]
_qmm_gemv = _tuned(_qmm_kernel, GEMV_CONFIGS, _MM_KEY, triton.Config({"BN": 128, "BK": 64}))
_qmm_dot = _tuned(_qmm_kernel, DOT_CONFIGS, _MM_KEY, DOT_CONFIGS[0])


def _mm_rows(M: int) -> tuple[int, bool]:
    """(BM, DOT) for a product of M rows: a row reduction for a few rows, tensor cores above
    (tl.dot needs 16 rows on the GPU: rows past M are masked)."""
    if M > 4:
        return (64 if M >= 64 else 16), True
    return _pow2(M), False


def qmatmul(x: torch.Tensor, w, w2=None) -> torch.Tensor:
    """x [M, K] fp32 (rows contiguous) @ w.T -> [M, N]; with w2, gelu(x @ w.T) * (x @ w2.T).
    w, w2: backends.cuda.DeviceWeight of one scheme and shape."""
    M, K = x.shape
    N = w.rows
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((M, N), dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    bm, dot = _mm_rows(M)
    sec = w2 if w2 is not None else w
    kern = _qmm_dot if dot else _qmm_gemv
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), triton.cdiv(M, bm))  # noqa: E731
    kern[grid](x, w.q, w.s, sec.q, sec.s, out, M, N, K, x.stride(0), out.stride(0),
               SCHEME=w.scheme_id, BS=max(w.block, 1), DUAL=w2 is not None, BM=bm, DOT=dot)
    return out


@triton.jit
def _embed_kernel(ids_ptr, q_ptr, s_ptr, out_ptr, N, K, SCHEME: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(ids_ptr + i + tl.arange(0, 1))
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        w = _load_w(q_ptr, s_ptr, row, rk, N, K, SCHEME, BS)  # [1, BK]
        tl.store(out_ptr + i.to(tl.int64) * K + rk[None, :], w, mask=(rk < K)[None, :])


def embed(ids: torch.Tensor, w) -> torch.Tensor:
    """ids [n] int32 (device) -> the dequantized rows [n, cols]."""
    n = ids.shape[0]
    out = torch.empty((n, w.cols), dtype=torch.float32, device=ids.device)
    if n:
        _embed_kernel[(n,)](ids, w.q, w.s, out, w.rows, w.cols, SCHEME=w.scheme_id, BS=max(w.block, 1),
                            BK=min(1024, _pow2(w.cols, 16)))
    return out


# ----------------------------------------------------------------------------- norms

@triton.jit
def _rmsnorm_kernel(x_ptr, h_ptr, w_ptr, w2_ptr, out_ptr, nxt_ptr, D, eps,
                    ADD: tl.constexpr, NEXT: tl.constexpr, BD: tl.constexpr):
    """One row: out = rmsnorm(x) * w, or with ADD out = x + rmsnorm(h) * w (the residual
    step) and with NEXT also nxt = rmsnorm(out) * w2 (the next block's input)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BD)
    m = c < D
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    if ADD:
        h = tl.load(h_ptr + r * D + c, mask=m, other=0.0)
        x = tl.load(x_ptr + r * D + c, mask=m, other=0.0)
        y = x + h * (1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)) * w
    else:
        x = tl.load(x_ptr + r * D + c, mask=m, other=0.0)
        y = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)) * w
    tl.store(out_ptr + r * D + c, y, mask=m)
    if NEXT:
        w2 = tl.load(w2_ptr + c, mask=m, other=0.0)
        z = y * (1.0 / tl.sqrt(tl.sum(y * y, axis=0) / D + eps)) * w2
        tl.store(nxt_ptr + r * D + c, z, mask=m)


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    rows = x.numel() // D if D else 0
    if rows:
        _rmsnorm_kernel[(rows,)](x, x, w, w, out, out, D, float(eps), ADD=False, NEXT=False, BD=_pow2(D))
    return out


def add_rmsnorm(x: torch.Tensor, h: torch.Tensor, w_post: torch.Tensor, eps: float, w_next=None):
    x, h = x.contiguous(), h.contiguous()
    D = x.shape[-1]
    out = torch.empty_like(x)
    nxt = torch.empty_like(x) if w_next is not None else None
    rows = x.numel() // D if D else 0
    if rows:
        _rmsnorm_kernel[(rows,)](x, h, w_post, w_next if w_next is not None else w_post, out,
                                 nxt if nxt is not None else out, D, float(eps), ADD=True, NEXT=w_next is not None,
                                 BD=_pow2(D))
    return out, nxt


# ----------------------------------------------------------------------------- RoPE

@triton.jit
def _rope_kernel(x_ptr, w_ptr, pos_ptr, inv_ptr, out_ptr, H, HD, eps,
                 NORM: tl.constexpr, BH: tl.constexpr):
    """One (row, head): optional RMSNorm over the head, then rotate-half RoPE at the row's
    position (angles = position * inv_freq in fp32, as the reference)."""
    pid = tl.program_id(0)
    row = pid // H
    base = pid.to(tl.int64) * HD
    half = HD // 2
    c = tl.arange(0, BH)
    m = c < half
    x1 = tl.load(x_ptr + base + c, mask=m, other=0.0)
    x2 = tl.load(x_ptr + base + half + c, mask=m, other=0.0)
    if NORM:
        ms = (tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD
        r = 1.0 / tl.sqrt(ms + eps)
        x1 = x1 * r * tl.load(w_ptr + c, mask=m, other=0.0)
        x2 = x2 * r * tl.load(w_ptr + half + c, mask=m, other=0.0)
    p = tl.load(pos_ptr + row).to(tl.float32)
    ang = p * tl.load(inv_ptr + c, mask=m, other=0.0)
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    tl.store(out_ptr + base + c, x1 * cs - x2 * sn, mask=m)
    tl.store(out_ptr + base + half + c, x2 * cs + x1 * sn, mask=m)


def rope(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, w=None, eps: float = 0.0) -> torch.Tensor:
    """x [n, H, hd]; pos [n] int64 (device); inv [hd/2] fp32 (device)."""
    x = x.contiguous()
    n, H, hd = x.shape
    out = torch.empty_like(x)
    if n * H:
        _rope_kernel[(n * H,)](x, w if w is not None else x, pos, inv, out, H, hd, float(eps), NORM=w is not None,
                               BH=_pow2(hd // 2))
    return out


# ----------------------------------------------------------------------------- elementwise

@triton.jit
def _gelu_mul_kernel(g_ptr, u_ptr, out_ptr, n, B: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    u = tl.load(u_ptr + i, mask=m, other=0.0)
    tl.store(out_ptr + i, _gelu(g) * u, mask=m)


def gelu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g, u = g.contiguous(), u.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        b = 4096 if INTERPRET else 1024
        _gelu_mul_kernel[(triton.cdiv(n, b),)](g, u, out, n, B=b)
    return out


# ----------------------------------------------------------------------------- attention

@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, len_ptr, o_ptr, ml_ptr,
                 n, T, G, KV, HD, span, window, scale, softcap,
                 HAS_LEN: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, KV16: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Flash attention for one kv head, BM (query row, head-in-group) pairs and one span of
    keys. q [n, KV*G, HD], k/v [T, KV, HD] (fp16 or fp32), kpos [T] (-1 = empty slot).
    A key is visible iff kpos >= 0, qpos - kpos >= 0 and (window == 0 or < window).
    Spans are multiples of 128 keys (every BN divides them).
    With SPLIT the unnormalized partial (o, max, sum) of this span is written for a combine
    step; else the normalized output."""
    pid_r = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    r = pid_r * BM + tl.arange(0, BM)  # r = i * G + g
    rmask = r < n * G
    i = r // G
    head = kvh * G + r % G
    d = tl.arange(0, BD)
    dm = d < HD
    q = tl.load(q_ptr + (i.to(tl.int64) * (KV * G) + head)[:, None] * HD + d[None, :],
                mask=rmask[:, None] & dm[None, :], other=0.0)
    if KV16:  # the fp16 operand, made once (half the registers a tile of fp32 q holds)
        q = q.to(tl.float16)
    qp = tl.load(qpos_ptr + i, mask=rmask, other=0)
    kv_len = T
    if HAS_LEN:
        kv_len = tl.minimum(tl.load(len_ptr), T)
    lo = sp * span
    hi = tl.minimum(lo + span, kv_len)
    m_i = tl.zeros((BM,), dtype=tl.float32) - 1.0e30
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for s0 in range(lo, hi, BN):
        j = s0 + tl.arange(0, BN)
        jm = j < hi
        koff = (j.to(tl.int64) * KV + kvh)[:, None] * HD + d[None, :]
        k = tl.load(k_ptr + koff, mask=jm[:, None] & dm[None, :], other=0.0)
        if KV16:  # an fp16 cache: fp16 operands, fp32 accumulation (half the shared memory of TF32)
            s = tl.dot(q, tl.trans(k)) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        if SOFTCAP:
            z = s / softcap
            s = (1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)) * softcap
        kp = tl.load(kpos_ptr + j, mask=jm, other=-1)
        dist = qp[:, None] - kp[None, :]
        vis = (kp >= 0)[None, :] & (dist >= 0) & jm[None, :]
        if window > 0:
            vis = vis & (dist < window)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + koff, mask=jm[:, None] & dm[None, :], other=0.0)
        if KV16:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    if SPLIT:
        base = (sp.to(tl.int64) * (n * KV * G) + i.to(tl.int64) * (KV * G) + head)
        tl.store(o_ptr + base[:, None] * HD + d[None, :], acc, mask=rmask[:, None] & dm[None, :])
        tl.store(ml_ptr + base * 2, m_i, mask=rmask)
        tl.store(ml_ptr + base * 2 + 1, l_i, mask=rmask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + (i.to(tl.int64) * (KV * G) + head)[:, None] * HD + d[None, :], out,
                 mask=rmask[:, None] & dm[None, :])


# Key-block configs; the device picks per (head_dim, rows tile, cache dtype). A TF32 (fp32
# cache) tile stages twice the bytes of an fp16 one, so it gets the small key blocks.
ATTN_CONFIGS = [triton.Config({"BN": 64}, num_warps=4, num_stages=2),
                triton.Config({"BN": 32}, num_warps=4, num_stages=2),
                triton.Config({"BN": 32}, num_warps=8, num_stages=2),
                triton.Config({"BN": 64}, num_warps=8, num_stages=2),
                triton.Config({"BN": 128}, num_warps=8, num_stages=2),
                triton.Config({"BN": 32}, num_warps=4, num_stages=1)]


def _attn_prune(configs, named_args, **kw):
    """Configs whose staged K/V tiles fit the H100's shared memory (227 KiB), estimated as
    stages x BN x head_dim x 2 (K and V) x element size, plus the q tile."""
    bd, esize, bm = named_args.get("BD", kw.get("BD")), 2 if named_args.get("KV16", kw.get("KV16")) else 4, \
        named_args.get("BM", kw.get("BM"))
    fit = [c for c in configs
           if c.num_stages * c.kwargs["BN"] * bd * 2 * esize + bm * bd * esize <= 200 * 1024]
    return fit or configs[-1:]


_attn = triton.autotune(configs=ATTN_CONFIGS, key=["BD", "BM", "KV16", "SPLIT", "SOFTCAP"],
                        prune_configs_by={"early_config_prune": _attn_prune},
                        **({"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters
                           else {}))(_attn_kernel) if not INTERPRET else _attn_kernel
_SPAN = 128  # key spans are multiples of this (the largest BN)


def _attn_rows(rows: int, hd: int, kv16: bool) -> int:
    """Query rows per program (BM): larger tiles reuse each K/V tile more, but a 32 x 256 or
    64 x 128 fp32 accumulator no longer fits the registers beside the tiles (cuda_aot.py)."""
    if rows <= 16 or hd > 128:
        return 16
    return 32 if rows <= 32 or not kv16 else 64


def attention(q, k, v, qpos, kpos, window: int, scale: float, softcap, kv_len=None, splits: int | None = None):
    """q [n, H, hd] fp32, k/v [T, KV, hd] (both fp16 or both fp32), qpos [n] / kpos [T] int64
    device tensors -> [n, H*hd]. kv_len: optional device int scalar bounding the keys read (a
    static-shape decode step reads only the filled slots). Long key ranges with few queries
    are split over programs (split-K) and combined."""
    q = q.contiguous()
    n, H, hd = q.shape
    T, KV, _ = k.shape
    G = H // KV
    rows = n * G
    kv16 = k.dtype == torch.float16
    bm = _attn_rows(rows, hd, kv16)
    if kv16 != (v.dtype == torch.float16):
        v = v.to(k.dtype)
    if splits is None:
        blocks = triton.cdiv(rows, bm) * KV
        splits = 1 if (INTERPRET or blocks >= 64 or T <= 2 * _SPAN) else min(32, triton.cdiv(T, _SPAN))
    span = triton.cdiv(triton.cdiv(max(T, 1), splits), _SPAN) * _SPAN
    splits = max(1, triton.cdiv(max(T, 1), span))
    dev = q.device
    lenp = kv_len if kv_len is not None else kpos
    common = dict(HAS_LEN=kv_len is not None, SOFTCAP=bool(softcap), KV16=kv16, BM=bm, BD=_pow2(hd, 16))
    if INTERPRET:
        common["BN"] = 64
    grid = (triton.cdiv(rows, bm), KV, splits)
    if splits == 1:
        out = torch.empty((n, H, hd), dtype=torch.float32, device=dev)
        _attn[grid](q, k, v, qpos, kpos, lenp, out, out, n, T, G, KV, hd, span, int(window), float(scale),
                    float(softcap or 1.0), SPLIT=False, **common)
        return out.reshape(n, H * hd)
    part = torch.empty((splits, n, H, hd), dtype=torch.float32, device=dev)
    ml = torch.empty((splits, n, H, 2), dtype=torch.float32, device=dev)
    _attn[grid](q, k, v, qpos, kpos, lenp, part, ml, n, T, G, KV, hd, span, int(window), float(scale),
                float(softcap or 1.0), SPLIT=True, **common)
    out = torch.empty((n, H * hd), dtype=torch.float32, device=dev)
    _attn_combine_kernel[(n * H,)](part, ml, out, splits, n * H, hd, BS=_pow2(splits), BD=_pow2(hd, 16))
    return out


@triton.jit
def _attn_combine_kernel(part_ptr, ml_ptr, out_ptr, S, R, HD, BS: tl.constexpr, BD: tl.constexpr):
    """One (query row, head) of a split attention: the spans' partial outputs weighted by
    exp(max_s - max) and normalized by the weighted sums (spans that saw no key weigh 0)."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BS)
    sm = sp < S
    m = tl.load(ml_ptr + (sp * R + r) * 2, mask=sm, other=-1.0e30)
    l_ = tl.load(ml_ptr + (sp * R + r) * 2 + 1, mask=sm, other=0.0)
    w = tl.where(l_ > 0, tl.exp(m - tl.max(m, axis=0)), 0.0)
    den = tl.sum(w * l_, axis=0)
    d = tl.arange(0, BD)
    dm = d < HD
    acc = tl.load(part_ptr + (sp[:, None] * R + r) * HD + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + r * HD + d, o, mask=dm)


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, dpos_ptr, len_ptr, slots, W, BW: tl.constexpr):
    """One new row of a KV cache: K and V (W = kv_heads * head_dim values each, converted to
    the cache's dtype) into slot pos % slots, the slot's position, and the filled length
    raised to cover it: the slot comes from the device position, so a captured decode step
    writes the right slot at every position."""
    i = tl.program_id(0)
    p = tl.load(pos_ptr + i)
    slot = p % slots
    c = tl.arange(0, BW)
    m = c < W
    src = i.to(tl.int64) * W + c
    dst = slot * W + c
    tl.store(kc_ptr + dst, tl.load(k_ptr + src, mask=m).to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + dst, tl.load(v_ptr + src, mask=m).to(vc_ptr.dtype.element_ty), mask=m)
    tl.store(dpos_ptr + slot, p)
    tl.atomic_max(len_ptr, (slot + 1).to(tl.int32))


def kv_write(k, v, kc, vc, pos, dpos, dlen) -> None:
    """Rows k/v [n, KV, hd] (fp32) at positions pos [n] (int64, device) into the cache kc/vc
    [slots, KV, hd], dpos [slots] and dlen [1] (int32): one launch for the whole update."""
    k, v = k.contiguous(), v.contiguous()
    n = k.shape[0]
    if n:
        W = k.shape[1] * k.shape[2]
        _kv_write_kernel[(n,)](k, v, kc, vc, pos, dpos, dlen, kc.shape[0], W, BW=_pow2(W, 16))


def rope_inv_freq(hd: int, theta: float, scale: float):
    """The reference's inverse frequencies (numpy fp32), computed once per (hd, theta, scale)."""
    import numpy as np

    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    return (inv / np.float32(scale)).astype(np.float32)


__all__ = ["qmatmul", "embed", "rmsnorm", "add_rmsnorm", "rope", "gelu_mul", "attention", "kv_write",
           "rope_inv_freq", "INTERPRET"]
