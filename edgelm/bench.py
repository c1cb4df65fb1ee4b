"""`edgelm bench`: the seed's benchmark columns for one bundle.

One run = load the engine (init), prefill `p` prompt tokens (TTFT = prefill + first sample),
then decode `n` tokens greedily. The first run is a warm-up and is discarded; the median and
spread of the next `repeat` runs are reported. Achieved bandwidth = bytes read per decoded
token (every weight once, the tied head included, plus the KV cache read) x decode tok/s.

A bundle that keeps Gemma 3n's image/audio towers gets more columns, measured after the text
runs (so the text peak RSS stays the text path's) on one more Engine load, again one warm-up
round and `repeat` measured rounds (`media_once`): image encode ms per image at 256, 512 and
768 px (front end + tower + embedder), audio encode ms per second of a 10 s clip (decode,
log-mel, tower, embedder), TTFT of one image + 32 text tokens (from Session.generate to the
first token, the image's decoding and encoding included), the towers' bundle bytes, the RSS
that loading the engine adds (the towers are mmap-backed: loading copies none of them) and the
peak RSS with the media runs. The towers' bytes are not part of the decode GB/s: decoding never
reads them.
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


def current_rss_mib() -> float | None:
    """This process's resident set now (VmRSS), MiB; None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


# Tensor name prefixes of Gemma 3n's towers ("v.", "a.") and their embedders ("mm.v.", "mm.a.")
TOWER_PREFIXES = ("v.", "a.", "mm.")
IMAGE_SIZES = (256, 512, 768)  # the seed's image sizes, px (square)
AUDIO_SECONDS = 10
IMAGE_TTFT_TEXT_TOKENS = 32


def tower_bytes(bundle) -> int:
    """Bundle bytes of the towers' and their embedders' tensors (0 for a text-only bundle)."""
    return sum(bundle.tensor(n).nbytes for n in bundle.tensor_names() if n.startswith(TOWER_PREFIXES))


def media_kinds(meta: dict) -> tuple[str, ...]:
    """The towers a bundle keeps, from its header: ("vision", "audio"), a subset, or ()."""
    cfg = meta.get("config") or {}
    return tuple(k for k in ("vision", "audio") if isinstance(cfg.get(k), dict))


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


def _gpu_torch(eng):
    """torch, where the engine runs on a CUDA device (None elsewhere, the interpreter included)."""
    dev = getattr(eng.ops, "device", None)
    if eng.backend != "cuda" or getattr(dev, "type", None) != "cuda":
        return None
    return eng.ops.torch


def gpu_copy_gbs(nbytes: int = 1 << 30, passes: int = 5) -> float:
    """The device's memory bandwidth, GB/s: best-of-`passes` device-to-device copy of `nbytes`,
    counting the bytes read and written (the bound a decode step's reads are compared with)."""
    import torch

    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(passes + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        best = max(best, 2 * nbytes / (e0.elapsed_time(e1) / 1e3) / 1e9)
    del a, b
    torch.cuda.empty_cache()
    return best


def _threads_used(eng, requested):
    if eng.backend == "cpu":
        from .backends import native

        return native.get_threads()
    return requested


def run_once(path, prompt_tokens: int, gen_tokens: int, threads, max_tokens: int, backend: str, seed: int = 0,
             kv_dtype: str | None = None, prefill_chunk: int | None = None, attn_precision: str | None = None) -> dict:
    from .runtime.engine import Engine

    t0 = time.perf_counter()
    eng = Engine(path, backend=backend, threads=threads, max_tokens=max_tokens,
                 prefill_chunk=prefill_chunk, kv_dtype=kv_dtype, attn_precision=attn_precision)
    init_s = time.perf_counter() - t0
    # Python's random, not numpy.random: the latter loads OpenSSL (~3 MiB resident), which a
    # greedy run of the engine never does, and would count in the peak RSS.
    rng = random.Random(seed)
    specials = {eng.tokenizer.bos_id, *eng.stop_ids}
    vocab = eng.config.vocab_size
    lo, hi = min(1000, vocab // 2), min(vocab, 200_000)  # ordinary ids, clear of the special tokens
    ids = [eng.tokenizer.bos_id] + [rng.randrange(lo, hi) for _ in range(prompt_tokens - 1)]
    s = eng.create_session({"temperature": 0.0})
    gpu = _gpu_torch(eng)
    if gpu is not None:
        gpu.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    logits = s.prefill(ids)
    tok = s.sample(logits)
    t2 = time.perf_counter()
    for _ in range(gen_tokens):
        if tok in specials:
            tok = lo  # keep decoding: the benchmark measures speed, not text
        logits = s.decode_step(tok, device=True)  # a GPU keeps the logits: one id reaches the host
        tok = s.sample(logits)
    t3 = time.perf_counter()
    decode_tok_s = gen_tokens / (t3 - t2)
    # Gathered-only tables (Gemma 3n's per-layer embeddings) contribute one row per token.
    gathered = [n for n in eng.bundle.tensor_names() if n.startswith("per_layer_token_embd")]
    # the image/audio towers are never read by text decoding
    weight_bytes = eng.weight_bytes() - sum(eng.bundle.tensor(n).nbytes for n in gathered) - tower_bytes(eng.bundle)
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
        "attn_precision": eng.attn_precision,
        "meta": eng.bundle.header,
        "bytes_per_token": bytes_per_tok,
    }
    if gpu is not None:  # the allocator's peak: weights, caches and the step's temporaries
        out["peak_gpu_mib"] = gpu.cuda.max_memory_allocated() / 2**20
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



def _test_image(size: int, seed: int):
    """A random RGB PIL image of size x size (noise over a gradient: no codec shortcut)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[:, None, None]) / 2 + rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _test_wav(seconds: int, rate: int = 16_000, seed: int = 0) -> bytes:
    """A mono 16-bit WAV file's bytes: a gliding tone under a little noise."""
    import io
    import wave

    rng = np.random.default_rng(seed)
    t = np.arange(seconds * rate, dtype=np.float64) / rate
    x = 0.4 * np.sin(2 * np.pi * (220 + 30 * t) * t) + 0.05 * rng.standard_normal(t.size)
    pcm = np.clip(x * 32767, -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def media_capacity(meta: dict, max_tokens: int) -> int:
    """The KV-cache capacity of the media runs: --max-tokens, raised where needed to hold one
    image's expansion plus the 32 text tokens and the first new token."""
    vision = (meta.get("config") or {}).get("vision")
    if not isinstance(vision, dict):
        return max_tokens
    need = 1 + 2 * 8 + 2 + int(vision.get("soft_tokens", 256)) + IMAGE_TTFT_TEXT_TOKENS + 1  # BOS, "\n\n" x 2, boi/eoi
    return max(max_tokens, need)


def media_once(eng, kinds, images, png: bytes, wav: bytes, seed: int = 0) -> dict:
    """One round of the media columns on a loaded engine: image encode ms per size, audio
    encode (total s and ms per audio second), TTFT of one image + 32 text tokens (s)."""
    from .runtime import media
    from .runtime.content import Image, Tokens
    from .runtime.session import GenerationStats

    out: dict = {}
    if "vision" in kinds:
        from .multimodal import preprocess_image

        m = eng.config.vision
        enc = {}
        for size, img in images.items():
            t0 = time.perf_counter()
            pixels = preprocess_image(img, size=size, config=m.preprocess)
            with eng.lock:
                eng.model.encode_image(eng.config, eng.weights, eng.ops, pixels)
            enc[str(size)] = 1e3 * (time.perf_counter() - t0)
        out["image_encode_ms"] = enc
        rng = random.Random(seed)
        vocab = eng.config.vocab_size
        lo, hi = min(1000, vocab // 2), min(vocab, 200_000)  # ordinary ids, as run_once's
        if m.vocab_offset < hi:  # keep clear of the media ids of a small vocabulary
            hi = max(lo + 1, min(hi, m.vocab_offset, m.begin_id, m.token_id, m.end_id))
        ids = [rng.randrange(lo, hi) for _ in range(IMAGE_TTFT_TEXT_TOKENS)]
        s = eng.create_session({"temperature": 0.0})
        t0 = time.perf_counter()
        gen = s.generate([Image(png), Tokens(ids)], max_new_tokens=1)
        t1 = time.perf_counter()  # the image is decoded, preprocessed and encoded by now
        stats = next(x for x in gen if isinstance(x, GenerationStats))
        out["ttft_image_s"] = (t1 - t0) + stats.ttft_seconds
        del s, gen
    if "audio" in kinds:
        t0 = time.perf_counter()
        media.encode_audio(eng, wav)
        dt = time.perf_counter() - t0
        out["audio_encode_s"] = dt
        out["audio_encode_ms_per_s"] = 1e3 * dt / AUDIO_SECONDS
    return out


def media_bench(path, meta: dict, threads, max_tokens: int, backend: str, repeat: int, kv_dtype=None,
                prefill_chunk=None, progress: bool = True) -> dict:
    """The media columns of a bundle with towers: one Engine load (its RSS cost measured),
    one warm-up round, `repeat` measured rounds (see media_once)."""
    from .runtime.engine import Engine

    kinds = media_kinds(meta)
    images = {size: _test_image(size, 1) for size in IMAGE_SIZES} if "vision" in kinds else {}
    png = _png_bytes(_test_image(max(IMAGE_SIZES), 2)) if "vision" in kinds else b""
    wav = _test_wav(AUDIO_SECONDS) if "audio" in kinds else b""
    cap = media_capacity(meta, max_tokens)
    gc.collect()
    _release_free_heap()
    before = current_rss_mib()
    eng = Engine(path, backend=backend, threads=threads, max_tokens=cap,
                 prefill_chunk=prefill_chunk, kv_dtype=kv_dtype)
    after = current_rss_mib()
    try:
        tbytes = tower_bytes(eng.bundle)
        rounds = []
        it = range(repeat + 1)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="bench media (first round is warm-up)", unit="round", leave=False)
        for i in it:
            r = media_once(eng, kinds, images, png, wav, seed=i)
            if i > 0:
                rounds.append(r)
    finally:
        eng.close()
        del eng
        gc.collect()
        _release_free_heap()
    metrics: dict = {}
    if "vision" in kinds:
        metrics["image_encode_ms"] = {str(sz): _stats([r["image_encode_ms"][str(sz)] for r in rounds])
                                      for sz in IMAGE_SIZES}
        metrics["ttft_image_s"] = _stats([r["ttft_image_s"] for r in rounds])
    if "audio" in kinds:
        metrics["audio_encode_ms_per_s"] = _stats([r["audio_encode_ms_per_s"] for r in rounds])
        metrics["audio_encode_s"] = _stats([r["audio_encode_s"] for r in rounds])
    metrics["towers_idle_rss_mib"] = None if before is None or after is None else after - before
    metrics["peak_rss_media_mib"] = peak_rss_mib()
    return {"towers": list(kinds), "tower_bytes": tbytes, "media_capacity": cap, "image_sizes": list(IMAGE_SIZES),
            "audio_seconds": AUDIO_SECONDS, "ttft_image_text_tokens": IMAGE_TTFT_TEXT_TOKENS, "metrics": metrics}


def model_fields(meta: dict, path, synthetic, max_tokens) -> dict:
    """The result fields that describe the bundle measured (shared by the bench modes)."""
    q = meta.get("quantization", {})
    return {"model": str(path), "arch": meta.get("arch"), "scheme": q.get("scheme"),
            "embed_scheme": q.get("embed_scheme"), "synthetic": synthetic is not None,
            "synthetic_geometry": synthetic, "capacity": max_tokens}

def bench(path, prompt_tokens: int = 512, gen_tokens: int = 128, threads=None, repeat: int = 3,
          max_tokens: int = 1280, backend: str = "cpu", synthetic: str | None = None, progress: bool = True,
          probe: bool = True, kv_dtype: str | None = None, prefill_chunk: int | None = None,
          attn_precision: str | None = None) -> dict:
    """probe: also measure STREAM-style read GB/s, in a child process right after each measured
    run, and report decode GB/s as a % of the probe taken next to it (this host's bandwidth
    drifts by up to 2x within minutes, so a probe taken once, at another minute, is no bound).
    kv_dtype / prefill_chunk / attn_precision: as Engine's (None = its defaults: f16 on cpu, 128,
    f32)."""
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
                     prefill_chunk=prefill_chunk, attn_precision=attn_precision)
        if i > 0:
            if probe and r["backend"] == "cpu":  # the bound for this run's "% of bound"
                r["stream_read_gb_s"] = _stream_read_gbs_in_child(r["threads"])
            elif probe and "peak_gpu_mib" in r:
                r["stream_read_gb_s"] = gpu_copy_gbs()
            runs.append(r)
    rss = peak_rss_mib()
    probes = [r["stream_read_gb_s"] for r in runs if r.get("stream_read_gb_s")]
    stream = statistics.median(probes) if probes else None
    pct = [100.0 * r["decode_gb_s"] / r["stream_read_gb_s"] for r in runs if r.get("stream_read_gb_s")]
    mb = None
    if media_kinds(runs[0]["meta"]):  # after the text runs: their peak RSS is read above
        mb = media_bench(path, runs[0]["meta"], threads, max_tokens, backend, repeat, kv_dtype, prefill_chunk,
                         progress)
    res = {
        "backend": runs[0]["backend"],
        "isa": runs[0]["isa"],
        **model_fields(runs[0]["meta"], path, synthetic, max_tokens),
        "kv_dtype": runs[0]["kv_dtype"],
        "prefill_chunk": runs[0]["prefill_chunk"],
        "attn_precision": runs[0]["attn_precision"],
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
        | ({"peak_gpu_mib": max(r["peak_gpu_mib"] for r in runs)} if "peak_gpu_mib" in runs[0] else {})
        | ({"stream_read_gb_s": _stats(probes), "decode_pct_of_bound": _stats(pct)} if probes else {}),
    }
    if mb is not None:
        res["metrics"].update(mb.pop("metrics"))
        res.update(mb)
    return res


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
        ("backend", f"{res['backend']} ({res['isa']})" + (f", {res['threads']} threads" if res["threads"] else "")),
        ("scheme", label),
        ("context capacity", f"{res['capacity']} (KV cache {res.get('kv_dtype', 'f32')}, prefill chunk "
                             f"{res.get('prefill_chunk', '-')}, prefill attention {res.get('attn_precision', 'f32')})"),
        (f"prefill tok/s (p{res['prompt_tokens']})", f("prefill_tok_s", "{:.1f}")),
        (f"decode tok/s (n{res['gen_tokens']})", f("decode_tok_s", "{:.1f}")),
        ("time to first token s", f("ttft_s", "{:.3f}")),
        ("init s", f("init_s", "{:.3f}")),
        ("peak CPU RSS MiB", f"{m['peak_rss_mib']:.0f}"),
        *([("peak GPU memory MiB", f"{m['peak_gpu_mib']:.0f} (torch's allocator peak)")] if "peak_gpu_mib" in m else []),
        ("model size MiB", f"{res['model_bytes'] / 2**20:.1f}"),
        ("decode GB/s achieved", f("decode_gb_s", "{:.1f}")),
    ]
    if "decode_pct_of_bound" in m:
        probe = "device copy, read + written" if "peak_gpu_mib" in m else "STREAM-style"
        rows.append((f"memory read GB/s ({probe})", f("stream_read_gb_s", "{:.1f}") + ", probed after each run"))
        rows.append(("decode, % of bandwidth bound", f("decode_pct_of_bound", "{:.0f}") + " (each run against its probe)"))
    rows += media_rows(res)
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append(f"(median (min-max) of {res['repeats']} runs after a discarded warm-up)")
    return "\n".join(lines)


def _span(s: dict, fmt: str) -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def media_rows(res: dict) -> list[tuple[str, str]]:
    """The table rows of the tower columns (none for a text-only bundle)."""
    if not res.get("towers"):
        return []
    m = res["metrics"]
    rows = []
    for size, s in m.get("image_encode_ms", {}).items():
        rows.append((f"image encode ms ({size} px)", _span(s, "{:.0f}")))
    if "audio_encode_ms_per_s" in m:
        rows.append((f"audio encode ms per audio s ({res['audio_seconds']} s clip)",
                     _span(m["audio_encode_ms_per_s"], "{:.1f}")
                     + f", total {_span(m['audio_encode_s'], '{:.2f}')} s"))
    if "ttft_image_s" in m:
        rows.append((f"TTFT s, 1 image + {res['ttft_image_text_tokens']} tokens",
                     _span(m["ttft_image_s"], "{:.3f}") + " (image decode + encode included)"))
    share = 100.0 * res["tower_bytes"] / max(res["model_bytes"], 1)
    rows.append(("tower weights MiB", f"{res['tower_bytes'] / 2**20:.1f} ({share:.0f}% of the bundle; "
                                      f"{', '.join(res['towers'])})"))
    idle = m.get("towers_idle_rss_mib")
    rows.append(("towers idle RSS MiB", "-" if idle is None else
                 f"{idle:+.1f} (RSS after Engine load minus before: the towers stay mmap-backed)"))
    rows.append(("peak CPU RSS MiB, with media", f"{m['peak_rss_media_mib']:.0f}"))
    return rows
