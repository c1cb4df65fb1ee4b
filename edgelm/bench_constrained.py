"""`edgelm bench --json-schema FILE` (or --json-object, --regex, --grammar): decode speed
under a grammar against decode speed without one, in one process.

One engine serves every run. Its vocabulary for llguidance is built first and timed (the
one-time preparation of an engine's first constraint), then the grammar is compiled. A
warm-up pair is discarded; then `repeat` pairs follow, each a constrained and an
unconstrained generation of the same prompt and seed in a fresh session, in alternating
order. A constrained generation stops when the grammar completes, so the unconstrained one
decodes as many tokens as the constrained one produces (stop tokens ignored; above
temperature 0 each seed's count is learnt in an untimed pass first): both make the same
number of forward passes. Decode tok/s is each generation's own (GenerationStats:
tokens after the first over the time after prefill), and the ratio is taken per pair.
The constraint's MaskTimings give the per-token mask costs of the measured constrained runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .bench import _stats, _threads_used, model_fields, peak_rss_mib
from .errors import BadInputError

# Gemma's chat turn markers: every bundle edgelm runs is a Gemma 3 or 3n model.
_TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


def default_prompt(kind: str, value) -> str:
    """A prompt the constrained output answers naturally: a model asked for what the grammar
    allows writes it with few low-probability detours."""
    if kind == "json_schema":
        ask = ("Write one realistic example of a JSON document that follows this JSON Schema. "
               "Reply with the JSON only.\n" + json.dumps(value))
    elif kind == "json_object":
        ask = "Describe the city of Paris as a JSON object with a few fields. Reply with the JSON only."
    elif kind == "regex":
        ask = f"Write one example of text that fully matches the regular expression {value}. Reply with it only."
    else:
        ask = f"Write one example of text in the language of this Lark grammar. Reply with it only.\n{value}"
    return _TURN.format(ask)


def _vm_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def bench_constrained(path, make_constraint, kind: str, value, label: str, gen_tokens: int = 128, threads=None,
                      repeat: int = 5, max_tokens: int = 1280, backend: str = "cpu", kv_dtype: str | None = None,
                      prefill_chunk: int | None = None, temperature: float = 0.0, prompt: str | None = None,
                      synthetic: str | None = None, progress: bool = True) -> dict:
    """make_constraint(engine) -> Constraint (the CLI's, so that errors name its flag);
    kind/value: the constraint's kind and source, for the default prompt; label: how the
    report names it (e.g. "--json-schema person.json")."""
    for name, v, lo in (("-n", gen_tokens, 2), ("--repeat", repeat, 1), ("--max-tokens", max_tokens, 2)):
        if not isinstance(v, int) or v < lo:
            raise BadInputError(f"{name} must be an integer >= {lo}, got {v!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise BadInputError(f"--prefill-chunk must be an integer >= 1, got {prefill_chunk!r}")
    from .format.bundle import Bundle
    from .runtime.constrained import MaskTimings, vocabulary
    from .runtime.engine import Engine
    from .runtime.session import GenerationStats
    from .runtime.sampler import SamplerConfig

    sampler = SamplerConfig(temperature=temperature)  # a bad temperature fails before the model loads
    with Bundle(path):  # a bad file fails here, before any work
        pass
    t0 = time.perf_counter()
    eng = Engine(path, backend=backend, threads=threads, max_tokens=max_tokens,
                 prefill_chunk=prefill_chunk, kv_dtype=kv_dtype)
    init_s = time.perf_counter() - t0
    rss0 = _vm_rss_mib()
    t0 = time.perf_counter()
    vocabulary(eng)
    vocab_s = time.perf_counter() - t0
    vocab_rss = _vm_rss_mib() - rss0
    t0 = time.perf_counter()
    constraint = make_constraint(eng)
    compile_s = time.perf_counter() - t0
    text = prompt if prompt is not None else default_prompt(kind, value)
    n_prompt = len(eng.tokenize(text))
    if n_prompt + gen_tokens > max_tokens:
        raise BadInputError(f"the {n_prompt}-token prompt plus -n {gen_tokens} exceeds --max-tokens {max_tokens}")

    def generate(seed, con, n):
        s = eng.create_session(sampler.replace(seed=seed) if temperature else sampler)
        out = []
        for item in s.generate(text, max_new_tokens=n, constraint=con, stop_ids=None if con else []):
            if isinstance(item, GenerationStats):
                return item, "".join(out)
            out.append(item)
        raise AssertionError("generate() ended without its stats")

    def constrained(seed):
        st, out = generate(seed, constraint, gen_tokens)
        if st.generated_tokens < 2:
            raise BadInputError(f"{label}: the constrained output was {st.generated_tokens} token ({out!r}); "
                                "decode speed needs at least 2: give a grammar with longer outputs, or "
                                "another --prompt")
        return st, out

    # The warm-up pair, before the progress bar: a grammar too short to measure fails here.
    st, output = constrained(0)
    n_unc = st.generated_tokens
    generate(0, None, n_unc)
    # A seed writes the same tokens every time, so a pair's unconstrained run can decode as
    # many as its constrained one will, whichever runs first. Greedy runs all write the same.
    counts = {i: constrained(i)[0].generated_tokens for i in range(1, repeat + 1)} if temperature else {}
    constraint.timings = MaskTimings()  # from here on: the measured constrained runs only
    con_runs, unc_runs, ratios = [], [], []
    it = range(1, repeat + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bench constrained (after a warm-up pair)", unit="pair", leave=False)
    for i in it:
        pair = {}
        for which in (("c", "u") if i % 2 == 0 else ("u", "c")):  # alternating order
            if which == "c":
                pair["c"], output = constrained(i)
            else:
                pair["u"], _ = generate(i, None, counts.get(i, n_unc))
        c, u = pair["c"], pair["u"]
        con_runs.append(c)
        unc_runs.append(u)
        ratios.append(c.decode_tok_s / u.decode_tok_s)
    timings = constraint.timings.to_dict()
    res = {
        "mode": "constrained",
        "backend": eng.backend,
        "isa": getattr(eng.ops, "isa", "-"),
        **model_fields(eng.bundle.header, path, synthetic, max_tokens),
        "kv_dtype": eng.kv_dtype_name,
        "prefill_chunk": eng.prefill_chunk,
        "threads": _threads_used(eng, threads),
        "model_bytes": Path(path).stat().st_size,
        "constraint": {"kind": constraint.kind, "given": label},
        "temperature": temperature,
        "prompt": text,
        "prompt_tokens": n_prompt,
        "max_new_tokens": gen_tokens,
        "repeats": repeat,
        "tokens": {"constrained": [r.generated_tokens for r in con_runs],
                   "unconstrained": [r.generated_tokens for r in unc_runs]},
        "stop_reasons": [r.stop_reason for r in con_runs],
        "output": output,  # the last constrained run's text
        "init_s": init_s,
        "vocabulary_s": vocab_s,
        "vocabulary_rss_mib": vocab_rss,
        "compile_s": compile_s,
        "metrics": {
            "constrained_decode_tok_s": _stats([r.decode_tok_s for r in con_runs]),
            "unconstrained_decode_tok_s": _stats([r.decode_tok_s for r in unc_runs]),
            "ratio": _stats(ratios),
            "peak_rss_mib": peak_rss_mib(),
        } | timings,
    }
    eng.close()
    return res


def format_constrained_table(res: dict) -> str:
    m = res["metrics"]

    def f(key, fmt):
        s = m[key]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    def ms(key):
        v = m.get(key)
        return "-" if v is None else f"{v:.3f}"

    label = res["scheme"] or "?"
    if res.get("embed_scheme") and res["embed_scheme"] != res["scheme"]:
        label += f" / head {res['embed_scheme']}"
    toks = res["tokens"]
    con = sorted(set(toks["constrained"]))
    unc = sorted(set(toks["unconstrained"]))
    reasons = ", ".join(sorted(set(res["stop_reasons"])))
    masked = m.get("masked_tokens", 0)
    n = m.get("tokens", 0)
    rows = [
        ("model", res["model"] + ("  [SYNTHETIC random weights: " + res["synthetic_geometry"] + "]" if res["synthetic"] else "")),
        ("backend", f"{res['backend']} ({res['isa']}), {res['threads']} threads"),
        ("scheme", label),
        ("constraint", f"{res['constraint']['given']} ({res['constraint']['kind']}), temperature {res['temperature']:g}"),
        ("prompt tokens", str(res["prompt_tokens"])),
        ("tokens per run", f"constrained {'/'.join(map(str, con))} ({reasons}), unconstrained "
                           f"{'/'.join(map(str, unc))} (max {res['max_new_tokens']})"),
        ("vocabulary preparation s", f"{res['vocabulary_s']:.3f}, +{res['vocabulary_rss_mib']:.0f} MiB RSS "
                                     "(once per engine)"),
        ("grammar compile s", f"{res['compile_s']:.3f}"),
        ("decode tok/s unconstrained", f("unconstrained_decode_tok_s", "{:.1f}")),
        ("decode tok/s constrained", f("constrained_decode_tok_s", "{:.1f}")),
        ("constrained / unconstrained", f("ratio", "{:.3f}x") + ", per pair"),
        ("mask per token ms", f"compute {ms('mask_compute_ms')} (worker thread, beside the forward), "
                              f"waited for {ms('mask_wait_ms')}, applied {ms('mask_apply_ms')} "
                              f"({masked} of {n} tokens masked), advance {ms('advance_ms')}"),
        ("peak CPU RSS MiB", f"{m['peak_rss_mib']:.0f}"),
        ("output", json.dumps(res["output"][:120] + ("..." if len(res["output"]) > 120 else ""),
                              ensure_ascii=False)),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append(f"(median (min-max) of {res['repeats']} pairs after a discarded warm-up pair; "
                 "mask times are means over the measured constrained runs)")
    return "\n".join(lines)
