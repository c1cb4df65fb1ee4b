#!/usr/bin/env python3
"""What constrained decoding costs on a bundle (docs/structured-output.md):

    python benchmarks/constrained.py [BUNDLE] [--threads 2] [--repeat 5] [--json]

- vocabulary preparation: building llguidance's view of the tokenizer (once per engine), and
  the resident memory it adds;
- per token, replayed over greedy generations under a few JSON Schemas: the mask's
  computation (llguidance, on the calling thread here; during generation it runs beside the
  forward) and its application to the logits (numpy, 262k wide for Gemma);
- decode tok/s constrained against unconstrained: the same prompt and the same number of
  decoded tokens (the unconstrained run ignores stop tokens), alternating, medians of
  --repeat pairs, at temperature 0 and at temperature 1.

BUNDLE defaults to the default model. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
        "required": ["name", "age", "email"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"enum": ["old", "new", "big", "small"]}, "maxItems": 4},
        "location": {"type": "object", "properties": {
            "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25},
            "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.25}},
            "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["city", "tags", "location"], "additionalProperties": False},
    "json_object": None,
}
PROMPT = ("<start_of_turn>user\nDescribe a person and the city they live in, as JSON.<end_of_turn>\n"
          "<start_of_turn>model\n")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", "-r", type=int, default=5)
    ap.add_argument("-n", type=int, default=128, help="max new tokens per generation")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import numpy as np

    from edgelm.runtime.constrained import Constraint, ConstraintRun, vocabulary
    from edgelm.runtime.engine import Engine

    eng = Engine(a.bundle, threads=a.threads, max_tokens=1024)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    vocab = vocabulary(eng)
    res = {"bundle": str(eng.path), "vocab_size": vocab.n, "isa": getattr(eng.ops, "isa", "-"),
           "threads": a.threads, "vocabulary_seconds": time.perf_counter() - t0,
           "vocabulary_rss_mib": _rss_mib() - rss0, "schemas": {}}

    logits = np.random.default_rng(0).standard_normal(eng.config.vocab_size).astype(np.float32)

    def generate(constraint, temperature, seed, n, stop_ids=None):
        s = eng.create_session({"temperature": temperature, "seed": seed})
        for item in s.generate(PROMPT, max_new_tokens=n, constraint=constraint, stop_ids=stop_ids):
            if not isinstance(item, str):
                return item, list(s.generated_ids)

    fill_ms, apply_ms = [], []
    pairs = {0.0: ([], []), 1.0: ([], [])}
    for name, schema in SCHEMAS.items():
        c = Constraint(eng, json_object=True) if schema is None else Constraint(eng, json_schema=schema)
        stats, ids = generate(c, 0.0, None, a.n)
        # replay the tokens, timing each mask on this thread
        run = ConstraintRun(c)
        f, ap_ = [], []
        for tok in ids[:-1]:
            if not run.m.consume_token(tok):
                break
            t = time.perf_counter()
            run._fill()
            f.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            run.apply(logits)
            ap_.append((time.perf_counter() - t) * 1e3)
        fill_ms += f
        apply_ms += ap_
        res["schemas"][name] = {"tokens": stats.generated_tokens, "stop_reason": stats.stop_reason,
                                "text": eng.detokenize(ids)[:200], "mask_ms_median": statistics.median(f) if f else 0}
        for temperature, (con, unc) in pairs.items():
            for r in range(a.repeat):
                st, _ = generate(c, temperature, r, a.n)
                n = max(st.generated_tokens, 8)
                base, _ = generate(None, temperature, r, n, stop_ids=[])
                if st.generated_tokens > 1 and base.generated_tokens == st.generated_tokens:
                    con.append(st.decode_tok_s)
                    unc.append(base.decode_tok_s)
    res["mask_compute_ms"] = {"median": statistics.median(fill_ms), "p90": _pct(fill_ms, 0.9), "max": max(fill_ms)}
    res["mask_apply_ms"] = {"median": statistics.median(apply_ms), "p90": _pct(apply_ms, 0.9), "max": max(apply_ms)}
    for temperature, (con, unc) in pairs.items():
        c_, u_ = statistics.median(con), statistics.median(unc)
        res[f"decode_tok_s_t{temperature:g}"] = {"constrained": c_, "unconstrained": u_, "ratio": c_ / u_,
                                                 "pairs": len(con)}
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['bundle']}: vocabulary of {vocab.n} tokens, {res['isa']}, threads {a.threads or 'default'}")
    print(f"vocabulary preparation  {res['vocabulary_seconds']:.2f} s, +{res['vocabulary_rss_mib']:.0f} MiB RSS")
    for k in ("mask_compute_ms", "mask_apply_ms"):
        v = res[k]
        print(f"{k:<22}  median {v['median']:.4f}  p90 {v['p90']:.4f}  max {v['max']:.4f}")
    for temperature in pairs:
        v = res[f"decode_tok_s_t{temperature:g}"]
        print(f"decode tok/s, T={temperature:g}: constrained {v['constrained']:.1f}, unconstrained "
              f"{v['unconstrained']:.1f}, ratio {v['ratio']:.3f} ({v['pairs']} pairs)")
    for name, v in res["schemas"].items():
        print(f"  {name}: {v['tokens']} tokens ({v['stop_reason']}): {v['text'][:100]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
