#!/usr/bin/env python3
"""Small measurements behind docs/kernels.md's session-3 to session-7 figures. Not part of the test suite.

    python benchmarks/microbench.py smt                 # do the 2 vCPUs share one core's SIMD units?
    python benchmarks/microbench.py attention           # prefill/decode attention, 1 and 2 threads
    python benchmarks/microbench.py matmul              # qd8 GEMM, one-row tiles vs packed GEMM, 1 and 2 threads
    python benchmarks/microbench.py prefill BUNDLE      # p512 prefill: session-3 route vs fused blocks vs + packed GEMM
    python benchmarks/microbench.py fused BUNDLE        # decode: fused blocks vs the per-op loop, alternating
    python benchmarks/microbench.py rss BUNDLE          # where the resident memory of p512 + n128 goes
    python benchmarks/microbench.py attention-decode    # decode attention, cold/warm, with/without its prefetch
    python benchmarks/microbench.py decode-prefetch BUNDLE  # decode tok/s, decode-attention prefetch on/off
    python benchmarks/microbench.py capacity BUNDLE     # decode at KV capacity 4096 vs 1280, in one process
    python benchmarks/microbench.py prefault BUNDLE     # init / TTFT, bundle mapped lazily vs pages touched at load
    python benchmarks/microbench.py perf-target BUNDLE decode|prefill   # a steady loop for perf (see its help)
    python benchmarks/microbench.py decode-bound BUNDLE # decode, head GEMV and the rest vs the probe beside them
    python benchmarks/microbench.py gemv1b              # int4 GEMVs at the 1B's layer shapes vs the probe
    python benchmarks/microbench.py decode-phases BUNDLE  # a decode token's time by block phase vs the probe
    python benchmarks/microbench.py gemv-native [--base REV]  # one-row GEMV kernels in C++, vs a git revision
    python benchmarks/microbench.py gemm-native [--base REV]  # prefill-chunk GEMMs in C++, vs a git revision
    python benchmarks/microbench.py isa-peak  # this core's vpdpbusd / FMA peaks and the 270M prefill floor
    python benchmarks/microbench.py prefill-phases BUNDLE     # a p512 prefill's time by block phase
    python benchmarks/microbench.py prefill-ab BUNDLE weight-prefetch|attn-bf16  # p512 with a switch off / on
    python benchmarks/microbench.py ab-module OLD_SO BUNDLE   # decode / TTFT: this build vs an older .so
    python benchmarks/microbench.py attention-ab OLD_SO       # prefill-chunk attention: this build vs an older .so
    python benchmarks/microbench.py attention-bf16            # prefill-chunk attention: fp32 vs bf16 dot products
    python benchmarks/microbench.py few-rows-ab OLD_SO        # int8 products of 2-12 rows: this build vs an older .so
    python benchmarks/microbench.py few-row-route             # products of 2-15 rows: one-row tiles vs few-row route
    python benchmarks/microbench.py float-gemm-ab OLD_SO      # fp16/fp32 many-row products: this build vs an older .so

`smt` compiles a tiny C program with gcc (10 independent FMA / vpmaddubsw chains per thread)
and runs it on 1 and 2 threads: on two real cores the 2-thread total doubles; on two SMT
siblings of one core it stays flat.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SMT_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define R(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9)
static const long N = 300000000L;
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void* fma_chains(void* p) {
#define D(i) __m256 a##i = _mm256_set1_ps(i * 0.001f);
    R(D)
    const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-6f);
    for (long it = 0; it < N; it++) {
#define F(i) a##i = _mm256_fmadd_ps(a##i, b, c);
        R(F)
        __asm__ volatile("" ::: "memory");
    }
#define S(i) +a##i[0]
    *(float*)p = 0 R(S);
    return 0;
}
static void* maddubs_chains(void* p) {
#define DI(i) __m256i a##i = _mm256_set1_epi8(i);
    R(DI)
    const __m256i b = _mm256_set1_epi8(3);
    for (long it = 0; it < N; it++) {
#define FI(i) a##i = _mm256_maddubs_epi16(b, a##i);
        R(FI)
        __asm__ volatile("" ::: "memory");
    }
#define SI(i) +_mm256_extract_epi32(a##i, 0)
    *(int*)p = 0 R(SI);
    return 0;
}
int main(int argc, char** argv) {
    int n = atoi(argv[1]), mode = atoi(argv[2]);
    pthread_t t[8]; float r[8];
    double t0 = now();
    for (int i = 0; i < n; i++) pthread_create(&t[i], 0, mode ? maddubs_chains : fma_chains, &r[i]);
    for (int i = 0; i < n; i++) pthread_join(t[i], 0);
    printf("%.3f\n", N * 10.0 * n / (now() - t0) / 1e9);
    return 0;
}
"""


def cmd_smt(_a) -> None:
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "smt.c", Path(d) / "smt"
        src.write_text(SMT_C)
        subprocess.run(["gcc", "-O3", "-mavx2", "-mfma", "-o", str(exe), str(src), "-lpthread"], check=True)
        for mode, name in ((0, "vfmadd231ps"), (1, "vpmaddubsw")):
            g = [float(subprocess.run([str(exe), str(t), str(mode)], capture_output=True, text=True,
                                      check=True).stdout) for t in (1, 2)]
            print(f"{name}: 1 thread {g[0]:.2f} G instr/s, 2 threads {g[1]:.2f} G instr/s in total "
                  f"({g[1] / g[0]:.2f}x; 2.0x = two cores, ~1.0x = one core's SMT siblings)")


def _ops(threads: int):
    from edgelm.backends import cpu

    ops = cpu.CpuOps()
    ops.set_threads(threads)
    return ops


def _best(f, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def _alternate(set_mode, f, reps: int) -> dict[int, float]:
    """Best time of f() with a kernel switch at 0 and at 1, alternating twice."""
    best = {0: float("inf"), 1: float("inf")}
    for _ in range(2):
        for mode in (0, 1):
            set_mode(mode)
            best[mode] = min(best[mode], _best(f, reps))
    return best


def cmd_attention(_a) -> None:
    r = np.random.default_rng(0)
    H, KV, hd = 4, 1, 256
    for threads in (1, 2):
        ops = _ops(threads)
        for n, T in ((1, 512), (16, 512), (512, 512)):
            q = r.standard_normal((n, H, hd)).astype(np.float32)
            for kvd in (np.float32, np.float16):
                k = r.standard_normal((T, KV, hd)).astype(kvd)
                v = r.standard_normal((T, KV, hd)).astype(kvd)
                qp, kp = np.arange(T - n, T, dtype=np.int64), np.arange(T, dtype=np.int64)
                t = _best(lambda: ops.attention(q, k, v, qp, kp, 0, hd ** -0.5), 20 if n < 512 else 5)
                macs = 2 * H * hd * sum(min(T, T - n + i + 1) for i in range(n))
                print(f"threads {threads}  n {n:4d} keys {T}  K/V {np.dtype(kvd).name:8s} {t * 1e3:7.3f} ms  "
                      f"{macs / t / 1e9:5.1f} GMAC/s")


def cmd_attention_decode(_a) -> None:
    """One decode step's attention (4 heads on 1 KV head, hd 256, fp16 K/V) over 26 layers'
    distinct caches: cold (a 256 MiB sweep evicts them first) and warm (L3), with the decode
    prefetch (16-key blocks, next block's K/V prefetched; set_decode_prefetch(1)) against
    64-key blocks without it (0), alternating; then the fixed cost at few keys."""
    ops = _ops(2)
    m = ops._k.module
    r = np.random.default_rng(0)
    H, KV, hd, L = 4, 1, 256, 26
    junk = np.ones(64 << 20, np.float32)
    q = r.standard_normal((1, H, hd)).astype(np.float32)
    try:
        for T in (512, 1024):
            ks = [r.standard_normal((T, KV, hd)).astype(np.float16) for _ in range(L)]
            vs = [r.standard_normal((T, KV, hd)).astype(np.float16) for _ in range(L)]
            kpos = np.arange(T, dtype=np.int64)
            qp = np.array([T - 1], np.int64)

            def sweep() -> float:
                t = time.perf_counter()
                for k, v in zip(ks, vs):
                    ops.attention(q, k, v, qp, kpos, 0, hd ** -0.5)
                return (time.perf_counter() - t) / L

            cold: dict[int, list[float]] = {0: [], 1: []}
            warm: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(10):
                for mode in (0, 1):
                    m.set_decode_prefetch(mode)
                    junk.sum()
                    cold[mode].append(sweep())
                    warm[mode].append(sweep())
            ratio = np.array(cold[0]) / np.array(cold[1])
            print(f"{T} keys, 26 caches, per call: cold {np.median(cold[0]) * 1e6:.1f} us without prefetch, "
                  f"{np.median(cold[1]) * 1e6:.1f} us with ({np.median(ratio):.2f}x, {ratio.min():.2f}-{ratio.max():.2f});"
                  f" warm {np.median(warm[0]) * 1e6:.1f} / {np.median(warm[1]) * 1e6:.1f} us")
    finally:
        m.set_decode_prefetch(1)
    T = 512
    ks, vs = [r.standard_normal((T, KV, hd)).astype(np.float16) for _ in range(2)]
    kpos, qp = np.arange(T, dtype=np.int64), np.array([T - 1], np.int64)
    for threads in (1, 2):
        ops.set_threads(threads)
        for t_ in (16, 128, 512):
            f = lambda: ops.attention(q, ks[:t_], vs[:t_], qp, kpos[:t_], 0, hd ** -0.5)  # noqa: E731
            print(f"threads {threads} keys {t_:4d} (in cache): {_best(f, 200) * 1e6:6.1f} us")


def cmd_matmul(_a) -> None:
    """The int8-activation GEMM at prefill-chunk shapes (n = 128): the one-row tiles against
    the packed GEMM (set_packed_gemm 0/1), alternating, best of 7 each."""
    from edgelm.quant.schemes import quantize

    r = np.random.default_rng(0)
    ops = _ops(1)
    m = ops._k.module
    shapes = ((128, 2048, 640), (128, 640, 2048))  # gate/up and down of the 270M, one 128-token chunk
    try:
        for n, rows, cols in shapes:
            x = r.standard_normal((n, cols)).astype(np.float32)
            for sch in ("int4-b32", "int4-b128", "int8", "int8-b32"):
                w = quantize(r.standard_normal((rows, cols)).astype(np.float32), sch)
                for threads in (1, 2):
                    ops.set_threads(threads)
                    best = _alternate(m.set_packed_gemm, lambda: ops.matmul(x, w), 7)
                    g = {k: n * rows * cols / v / 1e9 for k, v in best.items()}
                    print(f"{n}x{rows}x{cols} {sch:10s} threads {threads}: tiles {g[0]:6.1f} GMAC/s  "
                          f"packed {g[1]:6.1f} GMAC/s  ({best[0] / best[1]:.2f}x)")
    finally:
        m.set_packed_gemm(1)


def cmd_float_gemm(a) -> None:
    """fp32/fp16 weights times float32 activations at the towers' and a prefill chunk's
    shapes: the one-row tiles against the packed outer-product GEMM (set_float_gemm 0/1),
    alternating, best of 4 each."""
    from edgelm.quant.schemes import quantize

    r = np.random.default_rng(0)
    ops = _ops(a.threads)
    m = ops._k.module
    # audio tower FFW (30 s), image tower stage-3 pointwise (768 px), MSFA, a 270M prefill chunk
    shapes = ((750, 6144, 1536), (2304, 1024, 256), (9216, 512, 128), (128, 2048, 640))
    try:
        for n, rows, cols in shapes:
            x = r.standard_normal((n, cols)).astype(np.float32)
            for sch in ("fp32", "fp16"):
                w = quantize((r.standard_normal((rows, cols)) * 0.03).astype(np.float32), sch)
                best = _alternate(m.set_float_gemm, lambda: ops.matmul(x, w), 4)
                g = {k: n * rows * cols / v / 1e9 for k, v in best.items()}
                print(f"{n}x{rows}x{cols} {sch}  threads {a.threads}: tiles {g[0]:6.1f} GMAC/s  "
                      f"gemm {g[1]:6.1f} GMAC/s  ({best[0] / best[1]:.2f}x)", flush=True)
    finally:
        m.set_float_gemm(1)


def cmd_prefill(a) -> None:
    """Prefill of 512 tokens (chunks of 128) in one process, three routes alternating:
    'loop' = the per-op Python loop with the one-row tiles, 'fused' = all blocks
    in one native call per chunk, 'fused+packed' = that plus the packed GEMM (the default)."""
    from edgelm.backends import cpu
    from edgelm.runtime.engine import Engine

    class LoopOps(cpu.CpuOps):
        gemma3_blocks = None

    fused = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    loop = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    loop.ops = LoopOps(loop.ops.isa)
    m = fused.ops._k.module
    ids = [2] + list(range(1000, 1511))
    routes = (("loop", loop, 0), ("fused", fused, 0), ("fused+packed", fused, 1))
    res: dict[str, list[float]] = {name: [] for name, _, _ in routes}
    try:
        for _ in range(a.rounds):
            for name, e, packed in routes:
                m.set_packed_gemm(packed)
                s = e.create_session({"temperature": 0.0})
                t = time.perf_counter()
                s.prefill(ids)
                res[name].append(512 / (time.perf_counter() - t))
    finally:
        m.set_packed_gemm(1)
    for k, v in res.items():
        print(f"{k:13s} prefill tok/s (p512): {' '.join(f'{x:.0f}' for x in v)}  median {np.median(v):.0f}")
    for k in ("fused", "fused+packed"):
        ratios = [b / x for x, b in zip(res["loop"], res[k])]
        print(f"{k} / loop per round: {' '.join(f'{x:.2f}' for x in ratios)}  median {np.median(ratios):.2f}")


def _decode_tok_s(engine, ids, n: int = 128) -> float:
    """Prefill `ids` in a fresh session, then time n greedy decode steps (fixed tokens)."""
    s = engine.create_session({"temperature": 0.0})
    s.prefill(ids)
    t = time.perf_counter()
    for i in range(n):
        s.decode_step(1000 + i)
    return n / (time.perf_counter() - t)


def cmd_fused(a) -> None:
    from edgelm.backends import cpu
    from edgelm.runtime.engine import Engine

    class LoopOps(cpu.CpuOps):
        gemma3_blocks = None

    fused = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    loop = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    loop.ops = LoopOps(loop.ops.isa)
    ids = [2] + list(range(1000, 1511))
    res: dict[str, list[float]] = {"fused": [], "loop": []}
    for _ in range(a.rounds):
        for name, e in (("fused", fused), ("loop", loop)):
            res[name].append(_decode_tok_s(e, ids))
    for k, v in res.items():
        print(f"{k:6s} decode tok/s (p512 n128): {' '.join(f'{x:.1f}' for x in v)}  median {np.median(v):.1f}")
    ratios = [f / lp for f, lp in zip(res["fused"], res["loop"])]
    print(f"fused / loop per round: {' '.join(f'{x:.3f}' for x in ratios)}  median {np.median(ratios):.3f}")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) // 1024
    return out


def cmd_rss(a) -> None:
    from edgelm.runtime.engine import Engine

    print(f"{'start':10s} {_status()}")
    e = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    print(f"{'engine':10s} {_status()}")
    s = e.create_session({"temperature": 0.0})
    tok = s.sample(s.prefill([2] + list(range(1000, 1511))))
    print(f"{'prefill':10s} {_status()}")
    for _ in range(128):
        tok = s.sample(s.decode_step(tok))
    print(f"{'decode':10s} {_status()}  (MiB; bundle {os.path.getsize(a.bundle) / 2**20:.1f})")
    rows: dict[str, int] = {}
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                cur = parts[5] if len(parts) > 5 else "[anonymous mappings]"
            elif line.startswith("Rss:"):
                rows[cur] = rows.get(cur, 0) + int(line.split()[1])
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {v / 1024:7.1f} MiB  {k}")


def cmd_decode_bound(a) -> None:
    """Decode against the bandwidth probe taken beside it, in one process: per round a
    STREAM-style probe, 24 decode steps after a 512-token prompt, then the head GEMV alone
    24 times; the head's share of the bytes and the rest of the token (the blocks, attention,
    Python) as % of the probe."""
    from edgelm.backends import native
    from edgelm.bench import kv_bytes_read
    from edgelm.runtime.engine import Engine

    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    bpt = eng.weight_bytes() + kv_bytes_read(eng, 512 + 12)
    head = eng.weights.embed
    h = np.random.default_rng(0).standard_normal((1, eng.config.hidden_size)).astype(np.float32)
    for _ in range(a.rounds):
        s = eng.create_session({"temperature": 0.0})
        s.prefill(ids)
        st = native.stream_read_gbs(512 << 20, a.threads, 3)
        t = time.perf_counter()
        for _ in range(24):
            s.decode_step(1000)
        tok = (time.perf_counter() - t) / 24
        t = time.perf_counter()
        for _ in range(24):
            eng.ops.matmul(h, head)
        th = (time.perf_counter() - t) / 24
        hg, rg = head.nbytes / th / 1e9, (bpt - head.nbytes) / (tok - th) / 1e9
        print(f"probe {st:5.1f} GB/s  token {tok * 1e3:6.2f} ms ({100 * bpt / tok / 1e9 / st:3.0f}%)  "
              f"head {th * 1e3:6.2f} ms {hg:5.1f} GB/s ({100 * hg / st:3.0f}%)  rest {rg:5.1f} GB/s ({100 * rg / st:3.0f}%)")


def cmd_decode_phases(a) -> None:
    """Where a decode token's time goes, by phase of the fused blocks (the native phase clock,
    set_phase_timing), plus the head GEMV and everything else (final norm, sampling, Python)
    as the remainder; each phase's bytes per second against a STREAM-style probe taken in
    the same round. 32 decode steps after a 512-token prompt per round."""
    from edgelm.backends import native
    from edgelm.bench import kv_bytes_read
    from edgelm.runtime.engine import Engine

    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    m = native.kernels(eng.ops.isa).module
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    head = eng.weights.embed
    h = np.random.default_rng(0).standard_normal((1, eng.config.hidden_size)).astype(np.float32)
    bpt = eng.weight_bytes() + kv_bytes_read(eng, 512 + 16)
    steps = 32
    rows: dict[str, list[tuple[float, float]]] = {}
    whole = []
    for _ in range(a.rounds):
        s = eng.create_session({"temperature": 0.0})
        s.prefill(ids)
        st = native.stream_read_gbs(512 << 20, a.threads, 3)
        m.phase_times(True)
        m.set_phase_timing(1)
        try:
            t = time.perf_counter()
            for i in range(steps):
                s.decode_step(1000 + i)
            tok = (time.perf_counter() - t) / steps
        finally:
            m.set_phase_timing(0)
        ph = m.phase_times(True)
        t = time.perf_counter()
        for _ in range(steps):
            eng.ops.matmul(h, head)
        th = (time.perf_counter() - t) / steps
        whole.append(100 * bpt / tok / 1e9 / st)
        ph["head GEMV (separately)"] = (th * steps, steps, head.nbytes * steps)
        blocks = sum(v[0] for k, v in ph.items() if not k.startswith("head"))
        ph["rest (final norm, sampling, Python)"] = (tok * steps - blocks - th * steps, steps, 0)
        for k, (sec, _calls, nbytes) in ph.items():
            pct_bw = 100 * nbytes / max(sec, 1e-12) / 1e9 / st if nbytes else float("nan")
            rows.setdefault(k, []).append((100 * sec / (tok * steps), pct_bw))
        print(f"probe {st:5.1f} GB/s  token {tok * 1e3:6.2f} ms  whole token {whole[-1]:3.0f}% of the bound")
    print(f"{'phase':38s} {'% of token':>14s} {'GB/s % of probe':>18s}   (medians over {a.rounds} rounds, min-max)")
    for k, v in rows.items():
        sh, bw = np.array([x[0] for x in v]), np.array([x[1] for x in v])
        b = f"{np.median(bw):5.0f} ({bw.min():.0f}-{bw.max():.0f})" if np.isfinite(bw).all() else ""
        print(f"{k:38s} {np.median(sh):5.1f} ({sh.min():.1f}-{sh.max():.1f}) {b:>18s}")


_NATIVE_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread"]
# the avx512 build's flags (setup.py), for gemm-native --isa avx512: the VNNI tiles
_NATIVE_ISA_FLAGS = {"avx2": [], "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]}
_SCHEME_IDS = {2: "int8", 3: "int8-b32", 4: "int4-b32", 5: "int4-b128"}  # the native scheme ids


def _native_base_exe(root: Path, src: Path, base: str, d: str, what: str, extra=()) -> Path:
    """Compiles `src` against edgelm/_native at git revision `base` (its headers only)."""
    old = Path(d) / "base"
    old.mkdir()
    got = subprocess.run(["git", "-C", str(root), "archive", base, "edgelm/_native"], capture_output=True)
    if got.returncode != 0:
        raise SystemExit(f"{what}: --base {base}: {got.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=got.stdout, check=True)
    exe = Path(d) / "bench_base"
    subprocess.run(["g++", *_NATIVE_FLAGS, *extra, "-I", str(old / "edgelm" / "_native"), "-o", str(exe), str(src)],
                   check=True)
    return exe


def cmd_prefill_phases(a) -> None:
    """Where a 512-token prefill's time goes (chunks of 128), by phase of the fused blocks (the
    native phase clock), in one process: rounds alternate between the clock off (the time
    printed as "prefill") and on (the split), so the clock's own cost shows as their ratio."""
    from edgelm.backends import native
    from edgelm.runtime.engine import Engine

    if not Path(a.bundle).is_file():
        raise SystemExit(f"prefill-phases: {a.bundle}: no such bundle")
    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    m = native.kernels(eng.ops.isa).module
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    plain, timed, rows = [], [], {}
    for r in range(2 * a.rounds):
        s = eng.create_session({"temperature": 0.0})
        m.phase_times(True)
        m.set_phase_timing(r % 2)
        try:
            t = time.perf_counter()
            s.prefill(ids)
            dt = time.perf_counter() - t
        finally:
            m.set_phase_timing(0)
        ph = m.phase_times(True)
        (timed if r % 2 else plain).append(dt)
        if r % 2:
            for k, (sec, _calls, _b) in ph.items():
                rows.setdefault(k, []).append(100 * sec / dt)
            rows.setdefault("rest (embedding, head, Python)", []).append(100 * (dt - sum(v[0] for v in ph.values())) / dt)
    print(f"prefill p512: {np.median(plain) * 1e3:.0f} ms (clock off), {np.median(timed) * 1e3:.0f} ms (clock on); "
          f"medians of {a.rounds}")
    for k, v in sorted(rows.items(), key=lambda kv: -np.median(kv[1])):
        print(f"  {k:32s} {np.median(v):5.1f}% ({min(v):.1f}-{max(v):.1f})")


def cmd_prefill_ab(a) -> None:
    """A p512 prefill (chunks of 128) with one of the native module's switches off and on,
    in one process, the order flipping every round: `weight-prefetch` (the packed GEMM's
    prefetch of the next weight rows; it also times the 18 layers' gate/up products of one
    128-row chunk, weights cold) or `attn-bf16` (prefill attention's bf16 dot products, where
    the CPU has AVX512_BF16). Prints the medians of the per-round time ratios off / on."""
    from edgelm.backends import native
    from edgelm.runtime.engine import Engine

    if not Path(a.bundle).is_file():
        raise SystemExit(f"prefill-ab: {a.bundle}: no such bundle")
    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    m = native.kernels(eng.ops.isa).module
    if a.what == "attn-bf16" and not eng.ops.set_attn_precision("bf16"):
        raise SystemExit("prefill-ab attn-bf16: this build or CPU has no bf16 attention path "
                         f"(build {m.BUILD_ISA}, ATTN_BF16 {m.ATTN_BF16!r})")

    def switch(on: bool) -> None:
        if a.what == "weight-prefetch":
            m.set_weight_prefetch(int(on))
        else:
            eng.ops.attn_bf16 = on

    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    x = np.random.default_rng(0).standard_normal((128, eng.config.hidden_size)).astype(np.float32)
    layers = eng.weights.layers

    def gate_up() -> None:
        for lw in layers:
            eng.ops.matmul_gelu_mul(x, lw.gate, lw.up)

    res: dict[str, list[float]] = {}
    try:
        for r in range(a.rounds):
            t = {}
            for on in ((False, True) if r % 2 else (True, False)):
                switch(on)
                s = eng.create_session({"temperature": 0.0})
                t0 = time.perf_counter()
                s.prefill(ids)
                t[("prefill", on)] = time.perf_counter() - t0
                if a.what == "weight-prefetch":
                    t0 = time.perf_counter()
                    gate_up()
                    t[("gate_up", on)] = time.perf_counter() - t0
            for k in {k for k, _ in t}:
                res.setdefault(k, []).append(t[(k, False)] / t[(k, True)])
                res.setdefault(k + " off", []).append(t[(k, False)])
                res.setdefault(k + " on", []).append(t[(k, True)])
    finally:
        switch(True if a.what == "weight-prefetch" else False)
    print(f"{a.what}, {a.bundle}, build {m.BUILD_ISA}, {a.threads} threads, {a.rounds} rounds:")
    for k in ("prefill", "gate_up"):
        if k in res:
            v = res[k]
            what = "p512 prefill" if k == "prefill" else f"gate/up of {len(layers)} layers, 128 rows"
            print(f"  {what}: off {np.median(res[k + ' off']) * 1e3:.1f} ms, on {np.median(res[k + ' on']) * 1e3:.1f} ms;"
                  f" off/on per round {np.median(v):.3f} ({min(v):.3f}-{max(v):.3f})")


def cmd_gemv_native(a) -> None:
    """The one-row qd8 GEMV straight on the kernel headers (benchmarks/native/gemvbench.cpp,
    compiled here with g++ and the avx2 build's flags) at L2, L3 and DRAM sizes. With --base
    REV the same program is also compiled against edgelm/_native at that git revision, and the
    two run alternately, --rounds times; --prefetch compiles one variant per distance;
    --busy-cpu N keeps a spinning process on CPU N meanwhile (a tenant taking one vCPU)."""
    root = Path(__file__).resolve().parent.parent
    src = root / "benchmarks" / "native" / "gemvbench.cpp"
    with tempfile.TemporaryDirectory() as d:
        exes: list[tuple[str, Path]] = []
        if a.base:
            exes.append((f"base {a.base}", _native_base_exe(root, src, a.base, d, "gemv-native")))
        for pf in a.prefetch or [None]:
            exe = Path(d) / f"gemv_{pf}"
            extra = [f"-DEDGELM_GEMV_PREFETCH={pf}"] if pf else []
            subprocess.run(["g++", *_NATIVE_FLAGS, *extra, "-I", str(root / "edgelm" / "_native"), "-o", str(exe),
                            str(src)], check=True)
            exes.append(("now" + (f" prefetch {pf}" if pf else ""), exe))
        busy = None
        if a.busy_cpu is not None:  # another tenant: a spinning process pinned to one CPU
            busy = subprocess.Popen(["taskset", "-c", str(a.busy_cpu), sys.executable, "-c", "while True: pass"])
        try:
            _gemv_native_runs(a, exes)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()


def cmd_gemm_native(a) -> None:
    """Prefill-chunk products (n = 128, the 270M's q/k/v, o, gate/up and down shapes) through
    the packed GEMM, straight on the kernel headers (benchmarks/native/gemmbench.cpp, g++
    with the flags of the build --isa names: avx2, or avx512 for the VNNI tiles, which needs
    a CPU with AVX-512 VNNI). With --base REV the same program is also compiled against
    edgelm/_native at that revision; the builds alternate, --rounds times, and the medians
    of GMAC/s are printed with now / base per round."""
    root = Path(__file__).resolve().parent.parent
    src = root / "benchmarks" / "native" / "gemmbench.cpp"
    extra = _NATIVE_ISA_FLAGS[a.isa]
    with tempfile.TemporaryDirectory() as d:
        exes: list[tuple[str, Path]] = []
        if a.base:
            exes.append(("base", _native_base_exe(root, src, a.base, d, "gemm-native", extra)))
        exe = Path(d) / "gemm_now"
        subprocess.run(["g++", *_NATIVE_FLAGS, *extra, "-I", str(root / "edgelm" / "_native"), "-o", str(exe), str(src)],
                       check=True)
        exes.append(("now", exe))
        for scheme in a.schemes:
            for threads in a.threads:
                res: dict[str, list[list[float]]] = {n: [] for n, _ in exes}
                shapes: list[str] = []
                for _ in range(a.rounds):
                    for name, e in exes:
                        out = subprocess.run([str(e), str(scheme), str(threads)], check=True, capture_output=True,
                                             text=True).stdout.splitlines()
                        shapes = [line.split()[0] for line in out]
                        res[name].append([float(line.split()[-2]) for line in out])  # "... N GMAC/s"
                print(f"{_SCHEME_IDS[scheme]}, {a.isa} flags, {threads} thread(s), n 128: GMAC/s, median (min-max) of {a.rounds}"
                      + (f"; base = {a.base}" if a.base else ""))
                now = np.array(res["now"])
                for j, shape in enumerate(shapes):
                    line = f"  {shape:8s} now {np.median(now[:, j]):6.1f} ({now[:, j].min():.1f}-{now[:, j].max():.1f})"
                    if a.base:
                        base = np.array(res["base"])
                        r = now[:, j] / base[:, j]
                        line += (f"  base {np.median(base[:, j]):6.1f}  now / base {np.median(r):.3f} "
                                 f"({r.min():.3f}-{r.max():.3f})")
                    print(line)


def cmd_few_row_route(a) -> None:
    """Integer products with a few activation rows (batched decode: one row per sequence), the
    one-row tiles against the few-row route of VNNI builds, alternating in one process
    (benchmarks/native/fewrowbench.cpp, g++ with the avx512 build's flags; needs AVX-512
    VNNI). Default shape: the 270M's output head (262144 x 640)."""
    root = Path(__file__).resolve().parent.parent
    src = root / "benchmarks" / "native" / "fewrowbench.cpp"
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "fewrow"
        subprocess.run(["g++", *_NATIVE_FLAGS, *_NATIVE_ISA_FLAGS["avx512"], "-I", str(root / "edgelm" / "_native"),
                        "-o", str(exe), str(src)], check=True)
        sid = {v: k for k, v in _SCHEME_IDS.items()}[a.scheme]
        for threads in a.threads:
            print(f"{a.scheme} {a.rows}x{a.cols}, avx512 flags, {threads} thread(s), medians of {a.rounds} rounds",
                  flush=True)
            subprocess.run([str(exe), str(sid), str(threads), str(a.rows), str(a.cols), str(a.rounds),
                            *map(str, a.n)], check=True)


def cmd_isa_peak(a) -> None:
    """This core's peak vpdpbusd and FMA rates (benchmarks/native/isapeak.cpp, avx512 flags),
    how other operations mixed into a vpdpbusd stream slow it, and the floor they put under a 512-token prefill of the 270M on --threads cores: its
    linear layers' MACs at the vpdpbusd peak plus its causal attention's MACs at the FMA peak,
    with nothing else (no scales, no conversions, no softmax, no loads) costing anything; on
    CPUs with AVX512_BF16 also the vdpbf16ps rate and the floor with bf16 attention."""
    from edgelm.backends import native

    if not native.cpu_supports("avx512"):
        raise SystemExit(f"isa-peak measures AVX-512 VNNI instructions: {native.isa_unavailable_reason('avx512')} "
                         f"(`microbench.py smt` measures the FMA and vpmaddubsw rates on any AVX2 CPU)")
    root = Path(__file__).resolve().parent.parent
    src = root / "benchmarks" / "native" / "isapeak.cpp"
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "isapeak"
        subprocess.run(["g++", "-O2", "-mavx2", "-mfma", "-mf16c", *_NATIVE_ISA_FLAGS["avx512"], "-mavx512bf16", "-o",
                        str(exe), str(src)], check=True)
        rates = {}
        for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
            k, v = line.split()
            rates[k] = float(v)
    dp = rates["vpdpbusd_ymm_per_s"] * 32  # int8 MACs per second, one core
    fma = rates["vfmadd_ymm_per_s"] * 8  # fp32 MACs per second, one core
    # gemma-3-270m: 18 layers, hidden 640, 4 query heads and 1 KV head of 256, MLP 2048
    L, D, H, KV, hd, F, n = 18, 640, 4, 1, 256, 2048, a.prompt
    linear = n * L * (D * (H + 2 * KV) * hd + H * hd * D + 3 * D * F)
    attn = L * H * hd * 2 * n * (n + 1) // 2
    t = linear / (dp * a.threads) + attn / (fma * a.threads)
    print(f"one core: vpdpbusd {rates['vpdpbusd_ymm_per_s'] / 1e9:.2f} G/s = {dp / 1e9:.0f} GMAC/s int8; "
          f"vfmadd {rates['vfmadd_ymm_per_s'] / 1e9:.2f} G/s = {fma / 1e9:.0f} GMAC/s fp32")
    mixes = {k[len("slowdown_"):]: v for k, v in rates.items() if k.startswith("slowdown_")}
    print("a vpdpbusd stream's time with other operations mixed in, over its time alone (1.00 = they"
          " issue on other pipes): " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in mixes.items()))
    print(f"270M prefill of {n} tokens: linear {linear / 1e9:.1f} GMAC, causal attention {attn / 1e9:.2f} GMAC; "
          f"floor on {a.threads} core(s) at those peaks: {t * 1e3:.0f} ms ({n / t:.0f} tok/s)")
    if "vdpbf16ps_ymm_per_s" in rates:  # bf16 prefill attention (Engine(attn_precision="bf16"))
        bf = rates["vdpbf16ps_ymm_per_s"] * 16
        tb = linear / (dp * a.threads) + attn / (bf * a.threads)
        print(f"one core: vdpbf16ps {rates['vdpbf16ps_ymm_per_s'] / 1e9:.2f} G/s = {bf / 1e9:.0f} GMAC/s bf16; "
              f"the floor with bf16 attention: {tb * 1e3:.0f} ms ({n / tb:.0f} tok/s)")


def _gemv_native_runs(a, exes) -> None:
    for scheme in a.schemes:
        for cols in a.cols:
            for threads in a.threads:
                res: dict[str, list[list[float]]] = {n: [] for n, _ in exes}
                for _ in range(a.rounds):
                    for name, exe in exes:
                        out = subprocess.run([str(exe), str(scheme), str(threads), str(cols)], check=True,
                                             capture_output=True, text=True).stdout
                        res[name].append([float(line.split()[4]) for line in out.splitlines()])
                print(f"{_SCHEME_IDS[scheme]} cols {cols}, {threads} thread(s): GB/s at L2 / L3 / DRAM sizes, "
                      f"median (min-max) of {a.rounds}")
                for name, v in res.items():
                    arr = np.array(v)
                    cells = "  ".join(f"{np.median(arr[:, j]):5.1f} ({arr[:, j].min():.1f}-{arr[:, j].max():.1f})"
                                      for j in range(arr.shape[1]))
                    print(f"  {name:24s} {cells}")


def cmd_ab_module(a) -> None:
    """Decode tok/s (n64 after a 512-token prompt) and TTFT (p512) with this checkout's kernel
    build against an older build of the same ISA (OLD_SO, e.g. built from a git worktree of
    an earlier commit with `EDGELM_BUILD_ISAS=avx2 python setup.py build_ext --inplace`), in one
    process, alternating; prints new / old per round."""
    from edgelm.backends import native
    from edgelm.runtime.engine import Engine

    old, isa = _load_old_kernels(a.old_so, "ab-module")
    if not Path(a.bundle).is_file():
        raise SystemExit(f"ab-module: {a.bundle}: no such bundle")
    engines = {}
    for which in ("old", "new"):
        eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
        if which == "old":
            if eng.ops.isa != isa:
                raise SystemExit(f"the engine picked {eng.ops.isa}, OLD_SO is {isa}")
            eng.ops._k = native.Kernels(isa, old)
            eng.ops._m = old
            old.set_threads(a.threads)
        engines[which] = eng
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    res: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for _ in range(a.rounds):
        for which, eng in engines.items():
            s = eng.create_session({"temperature": 0.0})
            t = time.perf_counter()
            s.prefill(ids)
            ttft = time.perf_counter() - t
            res[which].append((ttft, _decode_tok_s(eng, ids, 64)))
    o, n = np.array(res["old"]), np.array(res["new"])
    dec, pre = n[:, 1] / o[:, 1], o[:, 0] / n[:, 0]
    print(f"decode tok/s old {np.median(o[:, 1]):.1f}, new {np.median(n[:, 1]):.1f}; new / old per round "
          f"{np.median(dec):.3f} ({dec.min():.3f}-{dec.max():.3f})")
    print(f"TTFT p512 old {np.median(o[:, 0]) * 1e3:.0f} ms, new {np.median(n[:, 0]) * 1e3:.0f} ms; speed new / old "
          f"{np.median(pre):.3f} ({pre.min():.3f}-{pre.max():.3f}); {a.rounds} rounds")


def _load_old_kernels(old_so: str, what: str):
    """An older build of a kernel module (a _kern_<isa>.*.so file) as a second CpuOps-usable
    module object, with its ISA name."""
    import importlib.util

    name = Path(old_so).name.split(".")[0]
    if not Path(old_so).is_file() or not name.startswith("_kern_"):
        raise SystemExit(f"{what}: {old_so}: not a kernel module file (_kern_<isa>.*.so)")
    spec = importlib.util.spec_from_file_location(name, old_so)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    return old, name.removeprefix("_kern_")


def cmd_few_rows_ab(a) -> None:
    """Integer products of a few activation rows (batched decode: B sequences' rows against the
    output head, here a 65536 x 640 slice of it) through this checkout's kernels and an older
    build of the same ISA (OLD_SO), in one process, alternating, best of 5 calls per turn;
    checks that both give bitwise the same output."""
    old, isa = _load_old_kernels(a.old_so, "few-rows-ab")
    from edgelm.backends import native
    from edgelm.quant.schemes import quantize

    new_k, old_k = native.kernels(isa), native.Kernels(isa, old)
    for k in (new_k, old_k):
        k.set_threads(a.threads)
    r = np.random.default_rng(0)
    for scheme in a.schemes.split(","):
        t = quantize(r.standard_normal((65536, 640)).astype(np.float32), scheme)
        for n in (2, 4, 8, 12):
            x = r.standard_normal((n, 640)).astype(np.float32)
            if not np.array_equal(old_k.matmul(x, t, qd8=True), new_k.matmul(x, t, qd8=True)):
                raise SystemExit(f"few-rows-ab: {scheme} n={n}: the two builds give different outputs")
            ts: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(a.rounds):
                for name, k in (("old", old_k), ("new", new_k)):
                    ts[name].append(_best(lambda k=k: k.matmul(x, t, qd8=True), 5))
            ratio = np.array(ts["old"]) / np.array(ts["new"])
            print(f"{scheme} {n} rows x 65536 x 640, {a.threads} thread(s): old {np.median(ts['old']) * 1e3:.2f} ms, "
                  f"new {np.median(ts['new']) * 1e3:.2f} ms; new / old speed {np.median(ratio):.3f} "
                  f"({ratio.min():.3f}-{ratio.max():.3f}), {a.rounds} rounds; outputs bitwise equal")


# n x rows x cols of the float GEMM: the audio tower's FFW up / down and light-conv input (30 s),
# image-tower pointwise convolutions (768 px), a 270M prefill chunk
FLOAT_AB_SHAPES = ((750, 6144, 1536), (750, 1536, 6144), (750, 3072, 1536), (2304, 1024, 256), (9216, 512, 128),
                   (576, 1280, 2560), (128, 2048, 640))


def cmd_float_gemm_ab(a) -> None:
    """fp16/fp32 products with many rows (the packed float GEMM) through this checkout's
    kernels and an older build of the same ISA (OLD_SO), in one process, alternating, best of 3
    calls per turn; checks that both give bitwise the same output."""
    old, isa = _load_old_kernels(a.old_so, "float-gemm-ab")
    from edgelm.backends import native
    from edgelm.quant.schemes import quantize

    new_k, old_k = native.kernels(isa), native.Kernels(isa, old)
    for k in (new_k, old_k):
        k.set_threads(a.threads)
    r = np.random.default_rng(0)
    for n, rows, cols in FLOAT_AB_SHAPES:
        for scheme in a.schemes.split(","):
            t = quantize(r.standard_normal((rows, cols)).astype(np.float32) * 0.05, scheme)
            x = r.standard_normal((n, cols)).astype(np.float32)
            if not np.array_equal(old_k.matmul(x, t), new_k.matmul(x, t)):
                raise SystemExit(f"float-gemm-ab: {scheme} {n}x{rows}x{cols}: the two builds give different outputs")
            ts: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(a.rounds):
                for name, k in (("old", old_k), ("new", new_k)):
                    ts[name].append(_best(lambda k=k: k.matmul(x, t), 3))
            ratio = np.array(ts["old"]) / np.array(ts["new"])
            gm = lambda v: n * rows * cols / np.median(v) / 1e9  # noqa: E731
            print(f"{n}x{rows}x{cols} {scheme}, {a.threads} thread(s): old {gm(ts['old']):.1f}, new "
                  f"{gm(ts['new']):.1f} GMAC/s; new / old speed {np.median(ratio):.3f} ({ratio.min():.3f}-"
                  f"{ratio.max():.3f}), {a.rounds} rounds; outputs bitwise equal", flush=True)


def cmd_attention_ab(a) -> None:
    """Prefill-chunk attention (128 queries, 4 heads on 1 KV head, head_dim 256) through this
    checkout's kernels and an older build of the same ISA (OLD_SO), in one process,
    alternating, best of 5 calls per turn; checks that both give bitwise the same output."""
    from edgelm.backends import cpu, native

    old, isa = _load_old_kernels(a.old_so, "attention-ab")
    new_ops = cpu.CpuOps()
    old_ops = cpu.CpuOps()
    if new_ops.isa != isa:
        raise SystemExit(f"attention-ab: this CPU's build is {new_ops.isa}, OLD_SO is {isa}")
    old_ops._k = native.Kernels(isa, old)
    old_ops._m = old
    for o in (new_ops, old_ops):
        o.set_threads(a.threads)
    r = np.random.default_rng(0)
    H, KV, hd, n = 4, 1, 256, 128
    for T, kvd in ((512, np.float16), (256, np.float16), (512, np.float32)):
        q = r.standard_normal((n, H, hd)).astype(np.float32)
        k = r.standard_normal((T, KV, hd)).astype(kvd)
        v = r.standard_normal((T, KV, hd)).astype(kvd)
        qp, kp = np.arange(T - n, T, dtype=np.int64), np.arange(T, dtype=np.int64)
        outs = {name: o.attention(q, k, v, qp, kp, 0, hd ** -0.5) for name, o in (("old", old_ops), ("new", new_ops))}
        if not np.array_equal(outs["old"], outs["new"]):
            raise SystemExit("attention-ab: the two builds give different outputs")
        ts: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(a.rounds):
            for name, o in (("old", old_ops), ("new", new_ops)):
                ts[name].append(_best(lambda o=o: o.attention(q, k, v, qp, kp, 0, hd ** -0.5), 5))
        macs = 2 * H * hd * sum(min(T, T - n + i + 1) for i in range(n))
        ratio = np.array(ts["old"]) / np.array(ts["new"])
        print(f"{n} queries x {T} keys, K/V {np.dtype(kvd).name}, {a.threads} thread(s): old "
              f"{macs / np.median(ts['old']) / 1e9:.1f}, new {macs / np.median(ts['new']) / 1e9:.1f} GMAC/s; "
              f"new / old speed {np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}), {a.rounds} rounds; "
              f"outputs bitwise equal")


def cmd_attention_bf16(a) -> None:
    """Prefill-chunk attention (128 queries, 4 heads on 1 KV head, head_dim 256, fp16 K/V: the
    270M's shape) at the key counts of a p512 prefill's four chunks, fp32 against bf16 dot
    products (attention(bf16=True); a CPU with AVX512_BF16), alternating, best of 5 calls
    per turn; the last line sums the four chunks (a p512 prefill's attention)."""
    from edgelm.backends import cpu

    ops = cpu.CpuOps()
    m = ops._m
    if not (m.ATTN_BF16 and m.attn_bf16_ready()):
        raise SystemExit(f"attention-bf16: build {m.BUILD_ISA} on this CPU has no bf16 attention path")
    ops.set_threads(a.threads)
    r = np.random.default_rng(0)
    H, KV, hd, n = 4, 1, 256, 128
    tot = {False: 0.0, True: 0.0}
    for T in (128, 256, 384, 512):
        q = r.standard_normal((n, H, hd)).astype(np.float32)
        k, v = (r.standard_normal((T, KV, hd)).astype(np.float16) for _ in range(2))
        qp, kp = np.arange(T - n, T, dtype=np.int64), np.arange(T, dtype=np.int64)
        ts: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.rounds):
            for bf in (False, True):
                ts[bf].append(_best(lambda bf=bf: ops._k.attention(q, k, v, qp, kp, 0, hd ** -0.5, bf16=bf), 5))
        macs = 2 * H * hd * sum(min(T, T - n + i + 1) for i in range(n))
        ratio = np.array(ts[False]) / np.array(ts[True])
        for bf in tot:
            tot[bf] += float(np.median(ts[bf]))
        print(f"{n} queries x {T} keys, {a.threads} thread(s): fp32 {np.median(ts[False]) * 1e3:.3f} ms "
              f"({macs / np.median(ts[False]) / 1e9:.0f} GMAC/s), bf16 {np.median(ts[True]) * 1e3:.3f} ms "
              f"({macs / np.median(ts[True]) / 1e9:.0f} GMAC/s); fp32 / bf16 time {np.median(ratio):.2f} "
              f"({ratio.min():.2f}-{ratio.max():.2f}), {a.rounds} rounds")
    print(f"the four chunks of a p512 prefill: fp32 {tot[False] * 1e3:.2f} ms, bf16 {tot[True] * 1e3:.2f} ms, "
          f"{tot[False] / tot[True]:.2f}x")


def cmd_decode_prefetch(a) -> None:
    """Decode tok/s (p512 + n128) with the decode-attention prefetch on and off
    (set_decode_prefetch 1/0), alternating in one process."""
    from edgelm.backends import native
    from edgelm.runtime.engine import Engine

    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    m = native.kernels(eng.ops.isa).module
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    res: dict[int, list[float]] = {0: [], 1: []}
    try:
        for _ in range(a.rounds):
            for mode in (0, 1):
                m.set_decode_prefetch(mode)
                res[mode].append(_decode_tok_s(eng, ids))
    finally:
        m.set_decode_prefetch(1)
    r = np.array(res[1]) / np.array(res[0])
    print(f"decode tok/s: without {np.median(res[0]):.1f}, with {np.median(res[1]):.1f}; "
          f"with / without per round {np.median(r):.3f} ({r.min():.3f}-{r.max():.3f}), {a.rounds} rounds")


def cmd_capacity(a) -> None:
    """Decode tok/s (p512 + n128) at KV capacity 4096 against 1280, two engines on one bundle
    in one process, alternating, with the decode-attention prefetch on and off."""
    from edgelm.backends import native
    from edgelm.runtime.engine import Engine

    engs = {c: Engine(a.bundle, threads=a.threads, max_tokens=c) for c in (1280, 4096)}
    m = native.kernels(engs[1280].ops.isa).module
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    res = {(c, pf): [] for c in engs for pf in (0, 1)}
    try:
        for rnd in range(a.rounds):
            for pf in (1, 0):
                m.set_decode_prefetch(pf)
                for c in ((1280, 4096) if rnd % 2 else (4096, 1280)):
                    res[(c, pf)].append(_decode_tok_s(engs[c], ids))
    finally:
        m.set_decode_prefetch(1)
    for pf in (1, 0):
        r = np.array(res[(4096, pf)]) / np.array(res[(1280, pf)])
        print(f"decode prefetch {pf}: 1280 {np.median(res[(1280, pf)]):.1f} tok/s, 4096 {np.median(res[(4096, pf)]):.1f}"
              f"; 4096 / 1280 {np.median(r):.3f} ({r.min():.3f}-{r.max():.3f}), {a.rounds} rounds")


def cmd_prefault(a) -> None:
    """Init and TTFT (p512) with the bundle mapped lazily against every page touched at load
    (what MAP_POPULATE does), alternating, a fresh engine per run."""
    import gc

    from edgelm.runtime.engine import Engine

    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    res: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for _ in range(a.rounds):
        for touch in (0, 1):
            t0 = time.perf_counter()
            eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
            if touch:
                int(np.frombuffer(eng.bundle._mm, np.uint8)[::4096].sum())
            t1 = time.perf_counter()
            s = eng.create_session({"temperature": 0.0})
            t2 = time.perf_counter()
            s.prefill(ids)
            res[touch].append((t1 - t0, time.perf_counter() - t2))
            del s
            eng.close()
            del eng
            gc.collect()
    for touch in (0, 1):
        v = np.array(res[touch])
        print(f"{'touched' if touch else 'lazy':7s}: init median {np.median(v[:, 0]) * 1e3:.1f} ms, "
              f"TTFT median {np.median(v[:, 1]) * 1e3:.1f} ms (min {v[:, 1].min() * 1e3:.1f}), {a.rounds} rounds")


def cmd_perf_target(a) -> None:
    """A steady loop to attach perf to: prints "start" after the warm-up, then runs --count
    decode steps after a 512-token prompt (decode) or --count prefills of 512 (prefill).
        python benchmarks/microbench.py perf-target BUNDLE decode --count 300 > out & \
        (until grep -q start out; do sleep 0.2; done; perf record -F 4000 -g -p $! -- sleep 8)
        perf report --no-children --sort sym -g none"""
    from edgelm.runtime.engine import Engine

    eng = Engine(a.bundle, threads=a.threads, max_tokens=1280)
    ids = [2] + [1000 + (i * 7919) % 100000 for i in range(511)]
    s = eng.create_session({"temperature": 0.0})
    s.prefill(ids)
    print("start", flush=True)
    for i in range(a.count):
        if a.what == "decode":
            if s.n_tokens + 1 > s.capacity:
                s = eng.create_session({"temperature": 0.0})
                s.prefill(ids)
            s.decode_step(1000)
        else:
            eng.create_session({"temperature": 0.0}).prefill(ids)


def cmd_gemv1b(a) -> None:
    """int4-b32 GEMVs at the Gemma 3 1B shapes (26 layers' worth of distinct weights, so they
    come from DRAM), through CpuOps (its Python call cost included), against the probe."""
    from edgelm.backends import cpu, native
    from edgelm.quant.schemes import quantize

    ops = cpu.CpuOps()
    ops.set_threads(a.threads)
    r = np.random.default_rng(0)

    def q(rows, cols):
        return quantize(r.standard_normal((rows, cols), dtype=np.float32), "int4-b32")

    layers = [dict(q=q(1024, 1152), k=q(256, 1152), v=q(256, 1152), o=q(1152, 1024), g=q(6912, 1152),
                   u=q(6912, 1152), d=q(1152, 6912)) for _ in range(26)]
    head = q(262144, 1152)
    x, xo, xd = (r.standard_normal((1, c)).astype(np.float32) for c in (1152, 1024, 6912))
    kinds = {"qkv": (lambda w: ops.matmul_multi(x, [w["q"], w["k"], w["v"]]), ("q", "k", "v")),
             "o": (lambda w: ops.matmul(xo, w["o"]), ("o",)),
             "gate+up": (lambda w: ops.matmul_gelu_mul(x, w["g"], w["u"]), ("g", "u")),
             "down": (lambda w: ops.matmul(xd, w["d"]), ("d",))}
    for _ in range(a.rounds):
        st = native.stream_read_gbs(512 << 20, a.threads, 3)
        t = time.perf_counter()
        ops.matmul(x, head)
        line = f"probe {st:5.1f} GB/s  head {head.nbytes / (time.perf_counter() - t) / 1e9:5.1f}"
        for name, (f, parts) in kinds.items():
            t = time.perf_counter()
            for w in layers:
                f(w)
            dt = (time.perf_counter() - t) / len(layers)
            nb = sum(layers[0][p].nbytes for p in parts)
            line += f"  {name} {nb / dt / 1e9:5.1f} ({dt * 1e6:4.0f} us)"
        print(line + "  GB/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("smt")
    sub.add_parser("attention")
    sub.add_parser("matmul")
    sub.add_parser("attention-decode")
    p = sub.add_parser("float-gemm")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("gemv1b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    for name in ("fused", "rss", "prefill", "decode-bound", "decode-prefetch", "capacity", "prefault",
                 "decode-phases", "prefill-phases"):
        p = sub.add_parser(name)
        p.add_argument("bundle")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--rounds", type=int, default=5)
    p = sub.add_parser("gemv-native")
    p.add_argument("--base", help="a git revision to compare against (its edgelm/_native headers)")
    p.add_argument("--prefetch", type=lambda v: [int(x) for x in v.split(",")], help="distances in bytes, e.g. 1024,2048")
    p.add_argument("--schemes", type=lambda v: [int(x) for x in v.split(",")], default=[2, 4],
                   help="scheme ids: 2 int8, 3 int8-b32, 4 int4-b32, 5 int4-b128 (default 2,4)")
    p.add_argument("--cols", type=lambda v: [int(x) for x in v.split(",")], default=[1152, 6912])
    p.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy-cpu", type=int, help="run a spinning process pinned to this CPU meanwhile")
    p = sub.add_parser("gemm-native")
    p.add_argument("--base", help="a git revision to compare against (its edgelm/_native headers)")
    p.add_argument("--schemes", type=lambda v: [int(x) for x in v.split(",")], default=[4, 5, 2],
                   help="scheme ids: 2 int8, 3 int8-b32, 4 int4-b32, 5 int4-b128 (default 4,5,2)")
    p.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--isa", choices=sorted(_NATIVE_ISA_FLAGS), default="avx2",
                   help="whose compiler flags: avx2 (default) or avx512 (the VNNI tiles)")
    p = sub.add_parser("isa-peak")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p = sub.add_parser("few-row-route")
    p.add_argument("--scheme", choices=("int8", "int8-b32", "int4-b32", "int4-b128"), default="int8-b32")
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--cols", type=int, default=640)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-n", type=int, nargs="+", default=[2, 4, 5, 8, 12, 15])
    p = sub.add_parser("few-rows-ab")
    p.add_argument("old_so")
    p.add_argument("--schemes", default="int8,int8-b32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p = sub.add_parser("float-gemm-ab")
    p.add_argument("old_so")
    p.add_argument("--schemes", default="fp16,fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p = sub.add_parser("attention-ab")
    p.add_argument("old_so")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p = sub.add_parser("ab-module")
    p.add_argument("old_so")
    p.add_argument("bundle")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p = sub.add_parser("attention-bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p = sub.add_parser("prefill-ab")
    p.add_argument("bundle")
    p.add_argument("what", choices=("weight-prefetch", "attn-bf16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p = sub.add_parser("perf-target")
    p.add_argument("bundle")
    p.add_argument("what", choices=("decode", "prefill"))
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    {"smt": cmd_smt, "attention": cmd_attention, "matmul": cmd_matmul, "fused": cmd_fused, "rss": cmd_rss,
     "prefill": cmd_prefill, "decode-bound": cmd_decode_bound, "gemv1b": cmd_gemv1b, "decode-prefetch": cmd_decode_prefetch,
     "capacity": cmd_capacity, "prefault": cmd_prefault, "perf-target": cmd_perf_target,
     "attention-decode": cmd_attention_decode, "decode-phases": cmd_decode_phases,
     "prefill-phases": cmd_prefill_phases, "prefill-ab": cmd_prefill_ab, "attention-bf16": cmd_attention_bf16,
     "gemv-native": cmd_gemv_native, "gemm-native": cmd_gemm_native, "isa-peak": cmd_isa_peak, "ab-module": cmd_ab_module,
     "attention-ab": cmd_attention_ab, "few-rows-ab": cmd_few_rows_ab, "few-row-route": cmd_few_row_route, "float-gemm": cmd_float_gemm,
     "float-gemm-ab": cmd_float_gemm_ab}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
