"""What batch-invariant kernels cost: prefill and decode with Engine(deterministic=True)
against the default kernels, alternating in one process, and a check that the
deterministic logits are bitwise equal however the prompt is fed.

    python benchmarks/determinism.py [BUNDLE] [-r 6] [-p 512] [-n 64]

BUNDLE defaults to the built-in model. Prints tok/s of each round and the median (min-max)
of the per-round ratios deterministic / default; --json FILE writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("-r", "--rounds", type=int, default=6)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()

    from edgelm import Engine
    from edgelm.backends import native

    engines = {det: Engine(a.bundle, deterministic=det, threads=a.threads, max_tokens=a.prompt_tokens + a.gen_tokens + 8)
               for det in (False, True)}
    eng = engines[True]
    text = "The quick brown fox jumps over the lazy dog while the cat watches from the fence. " * 200
    ids = eng.tokenize(text, add_bos=True)[:a.prompt_tokens]

    def once(det: bool) -> tuple[float, float]:
        s = engines[det].create_session()
        t0 = time.perf_counter()
        tok = int(np.argmax(s.prefill(ids)))
        t1 = time.perf_counter()
        for _ in range(a.gen_tokens):
            tok = int(np.argmax(s.decode_step(tok)))
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), a.gen_tokens / (t2 - t1)

    once(False), once(True)  # warm up both
    rounds = []
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {det: once(det) for det in order}
        rounds.append({"default": got[False], "deterministic": got[True]})
        print(f"round {r + 1}: prefill {got[False][0]:7.1f} -> {got[True][0]:7.1f} tok/s, "
              f"decode {got[False][1]:6.1f} -> {got[True][1]:6.1f} tok/s", flush=True)

    def summary(i: int) -> dict:
        q = [x["deterministic"][i] / x["default"][i] for x in rounds]
        return {"median": float(np.median(q)), "min": float(min(q)), "max": float(max(q))}

    # the property the cost buys
    ref = eng.create_session().prefill(ids[:64], return_logits=True)
    s = eng.create_session()
    steps = np.concatenate([s.prefill(ids[:1], return_logits=True)] + [s.decode_step(t)[None] for t in ids[1:64]])
    res = {"bundle": str(eng.path), "isa": eng.ops.isa, "threads": native.get_threads(),
           "machine": platform.machine(), "prompt_tokens": len(ids), "gen_tokens": a.gen_tokens,
           "prefill_ratio": summary(0), "decode_ratio": summary(1), "rounds": rounds,
           "bitwise_equal_prefill_vs_decode": bool(np.array_equal(steps, ref))}
    p, d = res["prefill_ratio"], res["decode_ratio"]
    print(f"{eng.path.name} on {res['isa']} ({res['threads']} threads): deterministic / default: "
          f"prefill {p['median']:.3f}x ({p['min']:.3f}-{p['max']:.3f}), decode {d['median']:.3f}x "
          f"({d['min']:.3f}-{d['max']:.3f}); logits bitwise equal fed whole or token by token: "
          f"{res['bitwise_equal_prefill_vs_decode']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
