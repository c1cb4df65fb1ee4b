#!/usr/bin/env python3
"""Where constrained decoding's time goes on a bundle (docs/structured-output.md, "Speed"):

    python benchmarks/constrained.py [BUNDLE] [--threads 2] [--repeat 5] [--dense-sampler] [--no-decode] [--json]

- vocabulary preparation: building llguidance's view of the tokenizer (once per engine), and
  the resident memory it adds;
- per token, replayed over a greedy generation under each of a few JSON Schemas, on the
  model's real logits along it: the mask's computation (llguidance, on this thread here;
  during generation it runs on a worker thread beside the forward), feeding the token to the
  matcher, the mask's application (numpy, 262k wide for Gemma) and sampling at
  temperature 1 from the masked logits against sampling from the raw ones; split by masks
  that allow most of the vocabulary (inside a JSON string) and masks that allow few; beside
  apply, the masked copy of the allowed positions alone (what apply did before it chose the
  fewer of the allowed and the forbidden);
- numpy alone, over the vocabulary's width: float64 exp of finite values against mostly
  -inf ones, and the cumulative sum that an inverse-CDF draw takes;
- decode tok/s constrained against unconstrained under each schema, at temperature 0 and 1:
  `edgelm bench --json-schema`'s measurement (edgelm/bench_constrained.py), --repeat pairs
  (--no-decode skips it).

--dense-sampler turns off the sampler's path for mostly-masked logits (sampler._live), which
gives the sampler as it was before it: the same draws, with exp and the cumulative sum over
the whole vocabulary. BUNDLE defaults to the default model. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "role": {"enum": ["engineer", "teacher", "doctor", "artist"]}},
        "required": ["name", "age", "city", "role"], "additionalProperties": False},
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


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _timed(f, reps=7):
    """Median ms of f() over reps calls."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", "-r", type=int, default=5)
    ap.add_argument("-n", type=int, default=128, help="max new tokens per generation")
    ap.add_argument("--dense-sampler", action="store_true", help="the sampler without its mostly-masked path")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode tok/s pairs")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import numpy as np

    from edgelm.bench_constrained import bench_constrained, default_prompt
    from edgelm.runtime import sampler as sampler_mod
    from edgelm.runtime.constrained import Constraint, ConstraintRun, vocabulary
    from edgelm.runtime.defaults import ensure_default_model
    from edgelm.runtime.engine import Engine
    from edgelm.runtime.sampler import SamplerConfig, sample

    if a.dense_sampler:
        sampler_mod._live = lambda y: None
    path = a.bundle or ensure_default_model()
    eng = Engine(path, threads=a.threads, max_tokens=1024)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    vocab = vocabulary(eng)
    res = {"bundle": str(path), "vocab_size": vocab.n, "isa": getattr(eng.ops, "isa", "-"),
           "threads": a.threads, "dense_sampler": a.dense_sampler,
           "vocabulary_seconds": time.perf_counter() - t0, "vocabulary_rss_mib": _rss_mib() - rss0,
           "schemas": {}}
    n = vocab.n
    t1 = SamplerConfig(temperature=1.0)
    rng = np.random.default_rng(0)
    rows = []  # per replayed token: (mostly allowed?, compute, consume, apply, sample masked, sample raw, copy allowed)
    buf = np.empty(n, np.float32)

    def copy_allowed(raw, ok):
        buf.fill(-np.inf)
        np.copyto(buf, raw, where=ok)
    for name, schema in SCHEMAS.items():
        kind, value = ("json_object", True) if schema is None else ("json_schema", schema)
        c = Constraint(eng, **{kind: value})
        prompt = default_prompt(kind, value)
        s = eng.create_session({"temperature": 0.0})
        for item in s.generate(prompt, max_new_tokens=a.n, constraint=c):
            if not isinstance(item, str):
                stats = item
        ids = list(s.generated_ids)
        # the same tokens again, with the model's logits before each
        replay = eng.create_session({"temperature": 0.0})
        logits = replay.prefill(eng.tokenize(prompt))
        run = ConstraintRun(c)
        for k, tok in enumerate(ids):
            raw = np.array(logits[:n])
            ok = run.allowed()
            mostly = 2 * int(ok.sum()) > n
            apply_ms = _timed(lambda: run.apply(raw))
            copy_ms = _timed(lambda: copy_allowed(raw, run.allowed()))
            masked = run.apply(raw).copy()
            sm = _timed(lambda: sample(masked, t1, rng))
            sr = _timed(lambda: sample(raw, t1, rng))
            t = time.perf_counter()
            run.m.consume_token(tok)
            consume_ms = 1e3 * (time.perf_counter() - t)
            compute_ms = None
            if not run.m.is_stopped():
                t = time.perf_counter()
                run._fill()
                compute_ms = 1e3 * (time.perf_counter() - t)
                run._check()
            rows.append((mostly, compute_ms, consume_ms, apply_ms, sm, sr, copy_ms))
            if k + 1 < len(ids):
                logits = replay.decode_step(tok)
        res["schemas"][name] = {"tokens": stats.generated_tokens, "stop_reason": stats.stop_reason,
                                "text": eng.detokenize(ids)[:200]}
    per_token = {}
    for label, sel in (("all", lambda r: True), ("mostly_allowed", lambda r: r[0]), ("few_allowed", lambda r: not r[0])):
        rs = [r for r in rows if sel(r)]
        per_token[label] = {"tokens": len(rs),
                            "mask_compute_ms": _mean([r[1] for r in rs if r[1] is not None]),
                            "consume_ms": _mean([r[2] for r in rs]), "apply_ms": _mean([r[3] for r in rs]),
                            "apply_copy_allowed_ms": _mean([r[6] for r in rs]),
                            "sample_t1_masked_ms": _mean([r[4] for r in rs]),
                            "sample_t1_raw_ms": _mean([r[5] for r in rs])}
    res["per_token_mean"] = per_token
    eng.close()
    x = np.random.default_rng(0).standard_normal(n) * 3
    masked = np.full(n, -np.inf)
    masked[:n // 1000] = x[:n // 1000]
    res["numpy_ms"] = {"exp_finite": _timed(lambda: np.exp(x), 50), "exp_mostly_neg_inf": _timed(lambda: np.exp(masked), 50),
                       "cumsum": _timed(lambda: np.cumsum(x), 50)}

    res["decode"] = {}
    for name, schema in ({} if a.no_decode else SCHEMAS).items():
        kind, value = ("json_object", True) if schema is None else ("json_schema", schema)
        for temperature in (0.0, 1.0):
            b = bench_constrained(path, lambda e: Constraint(e, **{kind: value}), kind, value, name, a.n, a.threads,
                                  a.repeat, 1024, temperature=temperature, progress=False)
            m = b["metrics"]
            res["decode"][f"{name}_t{temperature:g}"] = {
                "tokens": b["tokens"]["constrained"],
                "constrained": m["constrained_decode_tok_s"]["median"],
                "unconstrained": m["unconstrained_decode_tok_s"]["median"],
                "ratio": m["ratio"]["median"], "ratio_min": m["ratio"]["min"], "ratio_max": m["ratio"]["max"]}
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['bundle']}: vocabulary of {vocab.n} tokens, {res['isa']}, threads {a.threads or 'default'}"
          + (", DENSE sampler" if a.dense_sampler else ""))
    print(f"vocabulary preparation  {res['vocabulary_seconds']:.2f} s, +{res['vocabulary_rss_mib']:.0f} MiB RSS")
    print("per token, mean ms      tokens  mask compute  consume  apply  (copy allowed)  sample T=1 masked  "
          "sample T=1 raw")
    for label, v in per_token.items():
        def f(x):
            return "-" if x is None else f"{x:.3f}"
        print(f"  {label:<20}  {v['tokens']:>6}  {f(v['mask_compute_ms']):>12}  {f(v['consume_ms']):>7}  "
              f"{f(v['apply_ms']):>5}  {f(v['apply_copy_allowed_ms']):>14}  {f(v['sample_t1_masked_ms']):>17}  "
              f"{f(v['sample_t1_raw_ms']):>14}")
    v = res["numpy_ms"]
    print(f"numpy over {n} float64, median ms: exp finite {v['exp_finite']:.3f}, exp 99.9% -inf "
          f"{v['exp_mostly_neg_inf']:.3f}, cumsum {v['cumsum']:.3f}")
    for key, v in res["decode"].items():
        print(f"decode tok/s {key:<16} constrained {v['constrained']:.1f}, unconstrained {v['unconstrained']:.1f}, "
              f"ratio {v['ratio']:.3f} ({v['ratio_min']:.3f}-{v['ratio_max']:.3f}), tokens {sorted(set(v['tokens']))}")
    for name, v in res["schemas"].items():
        print(f"  {name}: {v['tokens']} tokens ({v['stop_reason']}): {v['text'][:100]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
