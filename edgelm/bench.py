"""`edgelm bench`: the seed's benchmark columns for one bundle.

One run = load the engine (init), prefill `p` prompt tokens (TTFT = prefill + first sample),
then decode `n` tokens greedily. The first run is a warm-up and is discarded; the median and
spread of the next `repeat` runs are reported. Achieved bandwidth = bytes read per decoded
token (every weight once, the tied head included, plus the KV cache read) x decode tok/s.
"""

from __future__ import annotations

import gc
import random
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from .errors import BadInputError


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB. Linux: VmHWM of /proc/self/status, the high-water
    mark of this program's own address space. (getrusage's ru_maxrss is not: it keeps the
    pre-exec maximum of the process it was forked from, so `bench` started by a large parent
    would report the parent's size.) Elsewhere: ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0  # macOS: bytes, others: KiB


def kv_bytes_read(engine, context: int) -> int:
    """Bytes of K and V one decode step reads at a given context length."""
    total = 0
    cfg = engine.config
    itemsize = np.dtype(getattr(engine, "kv_dtype", "float32")).itemsize
    per_tok = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize  # K and V
    for kind in getattr(cfg, "layer_types", ()):
        span = min(context, cfg.sliding_window) if kind == "local" else context
        total += span * per_tok
    return total


def _stream_read_gbs_in_child(threads: int) -> float | None:
    """STREAM-style read GB/s, probed in a child process so that its 512 MiB buffer counts
    neither in this process's peak RSS nor in that of whoever launched it."""
    import subprocess
    import sys

    code = ("import sys; from edgelm.backends import native; "
            "print(native.stream_read_gbs(512 << 20, int(sys.argv[1])))")
    p = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True)
    try:
        return float(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def _threads_used(eng, requested):
    if eng.backend == "cpu":
        from .backends import native

        return native.get_threads()
    return requested


def run_once(path, prompt_tokens: int, gen_tokens: int, threads, max_tokens: int, backend: str, seed: int = 0,
             kv_dtype: str | None = None, prefill_chunk: int | None = None) -> dict:
    from .runtime.engine import DEFAULT_PREFILL_CHUNK, Engine

    t0 = time.perf_counter()
    eng = Engine(path, backend=backend, threads=threads, max_tokens=max_tokens,
                 prefill_chunk=prefill_chunk or DEFAULT_PREFILL_CHUNK, kv_dtype=kv_dtype)
    init_s = time.perf_counter() - t0
    # Python's random, not numpy.random: the latter loads OpenSSL (~3 MiB resident), which a
    # greedy run of the engine never does, and would count in the peak RSS.
    rng = random.Random(seed)
    specials = {eng.tokenizer.bos_id, *eng.stop_ids}
    vocab = eng.config.vocab_size
    lo, hi = min(1000, vocab // 2), min(vocab, 200_000)  # ordinary ids, clear of the special tokens
    ids = [eng.tokenizer.bos_id] + [rng.randrange(lo, hi) for _ in range(prompt_tokens - 1)]
    s = eng.create_session({"temperature": 0.0})
    t1 = time.perf_counter()
    logits = s.prefill(ids)
    tok = s.sample(logits)
    t2 = time.perf_counter()
    for _ in range(gen_tokens):
        if tok in specials:
            tok = lo  # keep decoding: the benchmark measures speed, not text
        logits = s.decode_step(tok)
        tok = s.sample(logits)
    t3 = time.perf_counter()
    decode_tok_s = gen_tokens / (t3 - t2)
    # Gathered-only tables (Gemma 3n's per-layer embeddings) contribute one row per token.
    gathered = [n for n in eng.bundle.tensor_names() if n.startswith("per_layer_token_embd")]
    weight_bytes = eng.weight_bytes() - sum(eng.bundle.tensor(n).nbytes for n in gathered)
    bytes_per_tok = weight_bytes + kv_bytes_read(eng, prompt_tokens + gen_tokens // 2)
    out = {
        "init_s": init_s,
        "ttft_s": t2 - t1,
        "prefill_tok_s": prompt_tokens / (t2 - t1),
        "decode_tok_s": decode_tok_s,
        "decode_gb_s": bytes_per_tok * decode_tok_s / 1e9,
        "backend": eng.backend,
        "isa": getattr(eng.ops, "isa", "-"),
        "threads": _threads_used(eng, threads),
        "kv_dtype": eng.kv_dtype_name,
        "prefill_chunk": eng.prefill_chunk,
        "meta": eng.bundle.header,
        "bytes_per_token": bytes_per_tok,
    }
    del s, logits
    eng.close()
    del eng
    gc.collect()
    _release_free_heap()
    return out


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS between runs (glibc malloc_trim), so that each
    run's peak RSS is its own rather than the previous run's leftovers plus its own."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass



def model_fields(meta: dict, path, synthetic, max_tokens) -> dict:
    """The result fields that describe the bundle measured (shared by the bench modes)."""
    q = meta.get("quantization", {})
    return {"model": str(path), "arch": meta.get("arch"), "scheme": q.get("scheme"),
            "embed_scheme": q.get("embed_scheme"), "synthetic": synthetic is not None,
            "synthetic_geometry": synthetic, "capacity": max_tokens}

def bench(path, prompt_tokens: int = 512, gen_tokens: int = 128, threads=None, repeat: int = 3,
          max_tokens: int = 1280, backend: str = "cpu", synthetic: str | None = None, progress: bool = True,
          probe: bool = True, kv_dtype: str | None = None, prefill_chunk: int | None = None) -> dict:
    """probe: also measure STREAM-style read GB/s, in a child process right after each measured
    run, and report decode GB/s as a % of the probe taken next to it (this host's bandwidth
    drifts by up to 2x within minutes, so a probe taken once, at another minute, is no bound).
    kv_dtype / prefill_chunk: as Engine's (None = its defaults: f16 on cpu, 128)."""
    for name, v, lo in (("-p", prompt_tokens, 1), ("-n", gen_tokens, 1), ("--repeat", repeat, 1), ("--max-tokens", max_tokens, 2)):
        if not isinstance(v, int) or v < lo:
            raise BadInputError(f"{name} must be an integer >= {lo}, got {v!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise BadInputError(f"--prefill-chunk must be an integer >= 1, got {prefill_chunk!r}")
    if prompt_tokens + gen_tokens > max_tokens:
        raise BadInputError(f"-p {prompt_tokens} + -n {gen_tokens} exceeds --max-tokens {max_tokens}")
    from .format.bundle import Bundle

    with Bundle(path):  # a bad file fails here, before the progress bar
        pass
    runs = []
    it = range(repeat + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="bench (first run is warm-up)", unit="run", leave=False)
    for i in it:
        r = run_once(path, prompt_tokens, gen_tokens, threads, max_tokens, backend, seed=i, kv_dtype=kv_dtype,
                     prefill_chunk=prefill_chunk)
        if i > 0:
            if probe and r["backend"] == "cpu":  # the bound for this run's "% of bound"
                r["stream_read_gb_s"] = _stream_read_gbs_in_child(r["threads"])
            runs.append(r)
    rss = peak_rss_mib()
    probes = [r["stream_read_gb_s"] for r in runs if r.get("stream_read_gb_s")]
    stream = statistics.median(probes) if probes else None
    pct = [100.0 * r["decode_gb_s"] / r["stream_read_gb_s"] for r in runs if r.get("stream_read_gb_s")]
    return {
        "backend": runs[0]["backend"],
        "isa": runs[0]["isa"],
        **model_fields(runs[0]["meta"], path, synthetic, max_tokens),
        "kv_dtype": runs[0]["kv_dtype"],
        "prefill_chunk": runs[0]["prefill_chunk"],
        "threads": runs[0]["threads"],
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "model_bytes": Path(path).stat().st_size,
        "bytes_per_token": runs[0]["bytes_per_token"],
        "repeats": repeat,
        "stream_read_gb_s": stream,
        "metrics": {
            k: _stats([r[k] for r in runs])
            for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "init_s", "decode_gb_s")
        } | {"peak_rss_mib": rss}
        | ({"stream_read_gb_s": _stats(probes), "decode_pct_of_bound": _stats(pct)} if probes else {}),
    }


def format_table(res: dict) -> str:
    m = res["metrics"]

    def f(key, fmt):
        s = m[key]
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    label = res["scheme"] or "?"
    if res.get("embed_scheme") and res["embed_scheme"] != res["scheme"]:
        label += f" / head {res['embed_scheme']}"
    rows = [
        ("model", res["model"] + ("  [SYNTHETIC random weights: " + res["synthetic_geometry"] + "]" if res["synthetic"] else "")),
        ("backend", f"{res['backend']} ({res['isa']}), {res['threads']} threads"),
        ("scheme", label),
        ("context capacity", f"{res['capacity']} (KV cache {res.get('kv_dtype', 'f32')}, prefill chunk "
                             f"{res.get('prefill_chunk', '-')})"),
        (f"prefill tok/s (p{res['prompt_tokens']})", f("prefill_tok_s", "{:.1f}")),
        (f"decode tok/s (n{res['gen_tokens']})", f("decode_tok_s", "{:.1f}")),
        ("time to first token s", f("ttft_s", "{:.3f}")),
        ("init s", f("init_s", "{:.3f}")),
        ("peak CPU RSS MiB", f"{m['peak_rss_mib']:.0f}"),
        ("model size MiB", f"{res['model_bytes'] / 2**20:.1f}"),
        ("decode GB/s achieved", f("decode_gb_s", "{:.1f}")),
    ]
    if "decode_pct_of_bound" in m:
        rows.append(("memory read GB/s (STREAM-style)", f("stream_read_gb_s", "{:.1f}") + ", probed after each run"))
        rows.append(("decode, % of bandwidth bound", f("decode_pct_of_bound", "{:.0f}") + " (each run against its probe)"))
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append(f"(median (min-max) of {res['repeats']} runs after a discarded warm-up)")
    return "\n".join(lines)
