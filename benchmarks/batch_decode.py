"""Aggregate decode throughput of B sequences decoded together (Engine.decode_batch, what
`edgelm serve --parallel B` runs each step) against the same sequences decoded one at a
time, alternating in one process.

    python benchmarks/batch_decode.py [BUNDLE] [-b 8] [-n 32] [-r 4] [--deterministic]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("-b", "--batch", type=int, default=8)
    ap.add_argument("-n", "--steps", type=int, default=32)
    ap.add_argument("-r", "--rounds", type=int, default=4)
    ap.add_argument("--deterministic", action="store_true")
    a = ap.parse_args()

    from edgelm import Engine

    eng = Engine(a.bundle, deterministic=a.deterministic, max_tokens=64 + a.rounds * 2 * a.steps + 64)
    prompts = [f"Story number {i}: once upon a time" for i in range(a.batch)]

    def fresh():
        ss = [eng.create_session() for _ in prompts]
        return ss, [int(np.argmax(s.prefill(eng.tokenize(p, add_bos=True)))) for s, p in zip(ss, prompts)]

    def batched(ss, toks):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            toks = [int(x) for x in eng.decode_batch(ss, toks).argmax(1)]
        return a.batch * a.steps / (time.perf_counter() - t0), toks

    def alone(ss, toks):
        t0 = time.perf_counter()
        for _ in range(a.steps):
            toks = [int(np.argmax(s.decode_step(t))) for s, t in zip(ss, toks)]
        return a.batch * a.steps / (time.perf_counter() - t0), toks

    sb, tb = fresh()
    sa, ta = fresh()
    batched(sb, tb), alone(sa, ta)  # warm up
    ratios = []
    for r in range(a.rounds):
        if r % 2 == 0:
            xb, tb = batched(sb, tb)
            xa, ta = alone(sa, ta)
        else:
            xa, ta = alone(sa, ta)
            xb, tb = batched(sb, tb)
        ratios.append(xb / xa)
        print(f"round {r + 1}: {a.batch} together {xb:6.1f} tok/s, one at a time {xa:6.1f} tok/s", flush=True)
    print(f"{eng.path.name} on {eng.ops.isa}, batch {a.batch}{' deterministic' if a.deterministic else ''}: "
          f"aggregate decode together / one at a time {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
