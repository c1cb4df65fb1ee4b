#!/usr/bin/env python3
"""Where one decode token's time goes: wraps every op of the engine's op table with a timer.

    python benchmarks/profile_decode.py BUNDLE [--threads 2] [--context 200] [--steps 64] [--no-fused]
    python benchmarks/profile_decode.py BUNDLE --prefill [--context 512] [--chunk 256]

Prefills `--context` tokens, runs 8 unmeasured decode steps, then `--steps` measured ones,
and prints ms per token per op (the head GEMV separately) and the unaccounted rest (Python).
Forward steps of a Gemma 3 model (decode steps and prefill chunks) run
all blocks in one call (`gemma3_blocks`); --no-fused times the per-op loop instead, which
shows each op but adds the per-call Python cost (and, for prefill, numpy's allocations).
With --prefill it profiles the prefill of `--context` tokens instead (best of 3). For where
time goes inside the fused call, use perf (docs/kernels.md).
The timers themselves cost ~1.5 us per call. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import collections
import time

OPS = ("matmul", "matmul_multi", "matmul_gelu_mul", "add_rmsnorm", "rmsnorm_rope", "rmsnorm", "rope", "attention",
       "gelu_mul", "embed", "softcap", "gemma3_blocks")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prefill", action="store_true", help="profile the prefill instead of decode")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (with --prefill)")
    ap.add_argument("--no-fused", action="store_true",
                    help="decode through the per-op loop (one timer per op) instead of the fused blocks call")
    a = ap.parse_args()

    from edgelm.backends import get_backend
    from edgelm.runtime.engine import Engine

    ops = get_backend("cpu")
    if a.no_fused:
        ops.fused_plans = frozenset()  # models/gemma3.forward then runs its per-op loop
    e = Engine(a.bundle, backend=ops, threads=a.threads, max_tokens=max(1280, a.context + a.steps + 16),
               prefill_chunk=a.chunk)
    acc: dict[str, float] = collections.defaultdict(float)
    cnt: collections.Counter = collections.Counter()
    head = id(e.weights.embed)
    for name in OPS:
        f = getattr(e.ops, name, None)
        if f is None:
            continue

        def timed(*args, _f=f, _n=name, **kw):
            t = time.perf_counter()
            r = _f(*args, **kw)
            key = "head" if _n == "matmul" and id(args[1]) == head else _n
            acc[key] += time.perf_counter() - t
            cnt[key] += 1
            return r

        setattr(e.ops, name, timed)
    s = e.create_session({"temperature": 0})
    ids = e.tokenize("The history of the city " * (a.context // 4 + 1))[: a.context]
    if a.prefill:
        best = None
        for _ in range(3):
            acc.clear()
            cnt.clear()
            s.reset()
            t0 = time.perf_counter()
            s.prefill(ids)
            tot = time.perf_counter() - t0
            if best is None or tot < best[0]:
                best = (tot, dict(acc))
        tot, got = best
        print(f"prefill {len(ids)} tokens: {tot * 1000:.1f} ms ({len(ids) / tot:.0f} tok/s), {a.threads} threads, "
              f"chunk {e.prefill_chunk}, KV {e.kv_dtype_name}")
        for k, v in sorted(got.items(), key=lambda kv: -kv[1]):
            print(f"  {k:16s} {v * 1000:8.1f} ms  {100 * v / tot:5.1f}%")
        print(f"  {'other (Python)':16s} {(tot - sum(got.values())) * 1000:8.1f} ms")
        return 0
    s.prefill(ids)
    for _ in range(8):
        s.decode_step(5)
    acc.clear()
    cnt.clear()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        s.decode_step(5)
    tot = time.perf_counter() - t0
    n = a.steps
    print(f"total {tot / n * 1000:.2f} ms/token ({n / tot:.1f} tok/s), {a.threads} threads, context {a.context}, "
          f"KV {e.kv_dtype_name}")
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {k:16s} {v / n * 1000:7.3f} ms  {cnt[k] // n:4d} calls/token  {v / cnt[k] * 1e6:8.1f} us/call")
    print(f"  {'other (Python)':16s} {(tot - sum(acc.values())) / n * 1000:7.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
