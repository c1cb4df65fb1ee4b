#!/usr/bin/env python3
"""Side-by-side speed comparison of edgelm against llama.cpp and LiteRT-LM.

Not part of the test suite. Each pair runs edgelm and the peer ALTERNATELY on the same
model, threads and prompt/decode lengths: R rounds, each round one fresh process per
side (the order flips every round so slow drift of the shared host hits both sides
alike). One unmeasured warm-up run per side comes first: it warms the page cache and
writes LiteRT-LM's XNNPACK weight cache. The reported ratio is edgelm / peer, computed
per round (paired) and summarised as median and min-max over rounds.

    python benchmarks/compare.py --peer llama  -r 5
    python benchmarks/compare.py --peer litert -r 5 --json
    python benchmarks/compare.py --pair llama:Q4_0=int4-b32 --embed-scheme int8
    python benchmarks/compare.py --pair llama:Q4_0=int4-b32 --edgelm-args="--attn-precision bf16"
    python benchmarks/compare.py --peer llama --only-peer      # peer halves alone
    python benchmarks/compare.py --pair self:kv1280=int8 --max-tokens 4096   # edgelm 4096 vs 1280
    python benchmarks/compare.py --pair rev:2a55155=int8-b32 -r 6   # this tree against a commit

Pairs (peer model = edgelm scheme):
    llama:  Q4_0 = int4-b32, Q8_0 = int8, Q8_0 = int8-b32
    litert: int8 = int8, int4_b32 = int4-b32, int4_b128 = int4-b128
            (int8_kv4096 = int8 with --max-tokens 4096: the capacity comparison)
    self:   kvC = S: edgelm at --max-tokens against edgelm at capacity C, same bundle
    rev:    REV = S: edgelm against edgelm at git revision REV (built once, cached), same bundle

Peers are set up by benchmarks/peers.py (cached in ~/.cache/edgelm-peers or
$EDGELM_PEERS_DIR). edgelm bundles are converted there from the same source GGUF.

Per-run commands:
    llama.cpp  llama-bench -m F -p P -n N -t T -r 1 -o json
    LiteRT-LM  litert_lm.Benchmark(F, backend=Backend.CPU(thread_count=T), prefill_tokens=P,
               decode_tokens=N, max_num_tokens=C).run()   (in the LiteRT venv)
    edgelm     edgelm bench --model F -p P -n N --threads T --repeat 1 --max-tokens C --json --no-probe
               (--no-probe: the bandwidth probe's child would count in this process's ru_maxrss)
Peak RSS of every run is the child's ru_maxrss (os.wait4), for all three alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# metric -> (label, higher is better)
METRICS = {
    "prefill_tok_s": ("prefill tok/s", True),
    "decode_tok_s": ("decode tok/s", True),
    "ttft_s": ("TTFT s", False),
    "init_s": ("init s", False),
    "peak_rss_mib": ("peak RSS MiB", False),
}

LLAMA_PAIRS = [("Q4_0", "int4-b32"), ("Q8_0", "int8"), ("Q8_0", "int8-b32")]
LITERT_PAIRS = [("int8", "int8"), ("int4_b32", "int4-b32"), ("int4_b128", "int4-b128")]
LITERT_CAPACITY = {n: c for n, (_, c) in peers.LITERT_EXPORTS.items()}


# ---------------------------------------------------------------- child processes

def run_child(cmd, env=None, timeout=1800) -> tuple[str, str, float, float]:
    """Run cmd to completion; return stdout, stderr, wall seconds and the child's peak RSS (MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env)
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        so, se = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{se[-3000:]}")
    return so, se, wall, ru.ru_maxrss / 1024.0  # Linux: KiB


def _last_json(text: str):
    """The last top-level JSON object/array in text (tools may print logs before it)."""
    dec = json.JSONDecoder()
    for i in range(len(text) - 1, -1, -1):
        if text[i] in "{[" and (i == 0 or text[i - 1] == "\n"):
            try:
                return dec.raw_decode(text[i:])[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON found in output:\n" + text[-2000:])


# ---------------------------------------------------------------- edgelm side

def edgelm_cmd() -> list[str]:
    exe = os.environ.get("EDGELM_EXE")
    if exe:
        return exe.split()
    # Prefer the interpreter running this script if it can import edgelm, else the PATH one.
    try:
        import edgelm  # noqa: F401
        return [sys.executable, "-m", "edgelm"]
    except ImportError:
        pass
    venv = REPO / ".venv" / "bin" / "edgelm"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("edgelm")
    if found:
        return [found]
    raise RuntimeError("edgelm not found: install it (pip install -e .) or set EDGELM_EXE")


def _newest_source_mtime() -> float:
    newest = 0.0
    for sub in ("convert", "format", "quant"):
        for p in (REPO / "edgelm" / sub).rglob("*.py"):
            newest = max(newest, p.stat().st_mtime)
    return newest


def edgelm_bundle(scheme: str, embed: str, reconvert: bool = False) -> Path:
    """edgelm bundle converted from the same source GGUF, cached in the peers dir."""
    d = peers.peers_dir() / "edgelm"
    d.mkdir(parents=True, exist_ok=True)
    dst = d / f"gemma3-270m-{scheme}-head-{embed}.edgelm"
    stale = dst.exists() and dst.stat().st_mtime < _newest_source_mtime()
    if dst.exists() and not reconvert and not stale:
        return dst
    if stale:
        peers.log(f"{dst.name} is older than edgelm's converter sources: reconverting")
    tmp = dst.with_name(dst.stem + ".tmp.edgelm")
    peers.run([*edgelm_cmd(), "convert", peers.source_gguf(), "-o", tmp, "--scheme", scheme,
               "--embed-scheme", embed, "-q"])
    tmp.rename(dst)
    return dst


def rev_tree(rev: str) -> Path:
    """A copy of edgelm at git revision `rev` with its native kernels built in place, cached in
    the peers dir (the A/B peer for speed changes: `--pair rev:<commit>=<scheme>`)."""
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True).stdout.strip()
    if not full:
        raise SystemExit(f"rev pairs name a git revision of {REPO}, not {rev!r}")
    d = peers.peers_dir() / "edgelm-rev" / full[:12]
    if not (d / ".built").exists():
        shutil.rmtree(d, ignore_errors=True)
        (d / "src").mkdir(parents=True)
        peers.log(f"building edgelm {full[:12]} into {d} (native kernels: a few minutes)")
        arch = subprocess.run(["git", "-C", str(REPO), "archive", full], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(d / "src")], input=arch, check=True)
        # a plain (non-editable) install into its own folder; EDGELM_BUILD_ISAS is honoured
        peers.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", d / "site", d / "src"])
        (d / ".built").write_text(full + "\n")
    return d / "site"


def rev_cmd(site: Path) -> list[str]:
    """Run the edgelm installed in `site` with this interpreter (its dependencies are the same)."""
    return ["env", f"PYTHONPATH={site}", sys.executable, "-P", "-m", "edgelm"]  # -P: not the cwd's edgelm


def run_edgelm(bundle: Path, a, capacity: int, cmd: list[str] | None = None) -> dict:
    so, _, wall, rss = run_child([*(cmd or edgelm_cmd()), "bench", "--model", bundle, "-p", a.prompt, "-n", a.gen,
                                  "--threads", a.threads, "--repeat", 1, "--max-tokens", capacity, "--json",
                                  "--no-probe", *a.edgelm_args.split()])
    res = _last_json(so)
    m = res["metrics"]
    med = lambda k: m[k]["median"] if isinstance(m.get(k), dict) else m.get(k)  # noqa: E731
    return {
        "prefill_tok_s": med("prefill_tok_s"),
        "decode_tok_s": med("decode_tok_s"),
        "ttft_s": med("ttft_s"),
        "init_s": med("init_s"),
        "decode_gb_s": med("decode_gb_s"),
        "peak_rss_mib": rss,  # the whole child process (its own figure: m["peak_rss_mib"])
        "self_peak_rss_mib": m.get("peak_rss_mib"),
        "wall_s": wall,
        "info": {k: res.get(k) for k in ("backend", "isa", "scheme", "embed_scheme", "capacity",
                                          "threads", "model_bytes", "attn_precision", "prefill_chunk")},
    }


# ---------------------------------------------------------------- llama.cpp side

def run_llama(gguf: Path, a) -> dict:
    so, _, wall, rss = run_child([peers.llama_bin("llama-bench"), "-m", gguf, "-p", a.prompt, "-n", a.gen,
                                  "-t", a.threads, "-r", 1, "-o", "json", *a.llama_args.split()])
    rows = _last_json(so)
    out = {"peak_rss_mib": rss, "wall_s": wall}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out["prefill_tok_s"] = r["avg_ts"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out["decode_tok_s"] = r["avg_ts"]
        out.setdefault("info", {"type": r.get("model_type"), "size": r.get("model_size"),
                                "cpu": r.get("cpu_info"), "threads": r.get("n_threads"),
                                "build": r.get("build_commit")})
    return out


# ---------------------------------------------------------------- LiteRT-LM side

LITERT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import litert_lm
model, threads, p, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import_s = time.perf_counter() - t0
b = litert_lm.Benchmark(model, backend=litert_lm.Backend.CPU(thread_count=threads),
                        prefill_tokens=p, decode_tokens=n, max_num_tokens=cap)
r = b.run()

def plain(x, depth=0):
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    if hasattr(x, "total_seconds"):
        return x.total_seconds()
    if isinstance(x, dict):
        return {str(k): plain(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v, depth + 1) for v in x]
    if depth > 4:
        return repr(x)
    d = {k: getattr(x, k) for k in dir(x) if not k.startswith("_")}
    d = {k: v for k, v in d.items() if not callable(v)}
    return {k: plain(v, depth + 1) for k, v in d.items()} if d else repr(x)

print(json.dumps({"result": plain(r), "import_s": import_s}))
"""


def _find(d, *names):
    """First value in nested dict d whose key matches one of names (case-insensitive)."""
    names = [n.lower() for n in names]
    stack = [d]
    while stack:
        x = stack.pop(0)
        if isinstance(x, dict):
            for k, v in x.items():
                if k.lower() in names and isinstance(v, (int, float)):
                    return float(v)
            stack.extend(v for v in x.values() if isinstance(v, (dict, list)))
        elif isinstance(x, list):
            stack.extend(x)
    return None


def run_litert(model: Path, a, capacity: int) -> dict:
    env = dict(os.environ)
    so, se, wall, rss = run_child([peers.litert_python(), "-c", LITERT_CHILD, model, a.threads, a.prompt,
                                   a.gen, capacity], env=env)
    res = _last_json(so)
    r = res["result"]
    out = {
        "prefill_tok_s": _find(r, "last_prefill_tokens_per_second", "prefill_tokens_per_second",
                               "prefill_tok_s"),
        "decode_tok_s": _find(r, "last_decode_tokens_per_second", "decode_tokens_per_second",
                              "decode_tok_s"),
        "ttft_s": _find(r, "time_to_first_token_in_second", "time_to_first_token", "ttft_s",
                        "time_to_first_token_s"),
        "init_s": _find(r, "init_time_in_second", "init_time", "init_s", "total_init_time_in_second"),
        "peak_rss_mib": rss,
        "wall_s": wall,
        "raw": r,
    }
    return out


# ---------------------------------------------------------------- comparison

def summarize(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def default_embed(peer: str, scheme: str) -> str:
    """The edgelm head scheme closest to the peer's own head.

    llama-quantize keeps the tied 262144x640 embedding/head at Q8_0 for both Q4_0 and
    Q8_0 (640 is not a multiple of 256, so its usual Q6_K head falls back to Q8_0):
    edgelm int8 (per-channel, 8.05 bits) or int8-b32 (= Q8_0, 8.5 bits) for the b32 pair.
    LiteRT-LM's recipes quantize every op, the embedding/head included, with the same
    scheme as the linear layers."""
    if peer == "llama":
        return "int8-b32" if scheme == "int8-b32" else "int8"
    return scheme


def compare_pair(peer: str, peer_model: str, scheme: str, a) -> dict:
    capacity = a.max_tokens
    embed = a.embed_scheme or default_embed(peer, scheme)
    if peer == "rev":  # edgelm at another git revision, same bundle (peer_model: the revision)
        tree = rev_tree(peer_model)
        pfile = edgelm_bundle(scheme, embed, a.reconvert)
        peer_run = lambda: run_edgelm(pfile, a, capacity, rev_cmd(tree))  # noqa: E731
    elif peer == "self":  # edgelm against itself at another KV capacity (peer_model "kv1280")
        if not peer_model.startswith("kv") or not peer_model[2:].isdigit():
            raise SystemExit(f"self pairs name a capacity, e.g. self:kv1280=int8, not {peer_model!r}")
        pfile = edgelm_bundle(scheme, embed, a.reconvert)
        peer_run = lambda: run_edgelm(pfile, a, int(peer_model[2:]))  # noqa: E731
    elif peer == "llama":
        pfile = peers.llama_gguf(peer_model)
        if not pfile.exists():
            raise SystemExit(f"{pfile} missing: run python benchmarks/peers.py setup llama")
        peer_run = lambda: run_llama(pfile, a)  # noqa: E731
    else:
        pfile = peers.litert_model(peer_model)
        if not pfile.exists():
            raise SystemExit(f"{pfile} missing: run python benchmarks/peers.py setup litert")
        capacity = LITERT_CAPACITY.get(peer_model, capacity)
        peer_run = lambda: run_litert(pfile, a, capacity)  # noqa: E731
    sides = {"peer": peer_run}
    bundle = None
    if not a.only_peer:
        bundle = edgelm_bundle(scheme, embed, a.reconvert)
        sides["edgelm"] = lambda: run_edgelm(bundle, a, capacity)
    name = f"{peer}:{peer_model} vs edgelm {scheme} (head {embed})"
    peers.log(f"== {name}: {a.repeats} rounds, {a.threads} threads, p{a.prompt} n{a.gen}, capacity {capacity}")
    load_before = os.getloadavg()
    runs = {k: [] for k in sides}
    order = list(sides)
    for k in order:  # warm-up, discarded
        peers.log(f"   warm-up {k}")
        sides[k]()
    for i in range(a.repeats):
        seq = order if i % 2 == 0 else order[::-1]
        for k in seq:
            r = sides[k]()
            runs[k].append(r)
            peers.log(f"   round {i + 1} {k}: " + ", ".join(
                f"{m}={r[m]:.3g}" for m in METRICS if r.get(m) is not None))
    res = {
        "pair": name, "peer": peer, "peer_model": str(pfile), "peer_name": peer_model,
        "edgelm_scheme": scheme, "edgelm_embed_scheme": embed,
        "edgelm_model": str(bundle) if bundle else None,
        "threads": a.threads, "prompt_tokens": a.prompt, "gen_tokens": a.gen, "capacity": capacity,
        "rounds": a.repeats,
        "llama_args": a.llama_args if peer == "llama" else None,
        "edgelm_args": a.edgelm_args or None,
        "loadavg_1_5_15": {"before": [round(x, 2) for x in load_before],
                           "after": [round(x, 2) for x in os.getloadavg()]},
        "cpus": os.cpu_count(),
        "peer_info": runs["peer"][0].get("info"),
        "edgelm_info": runs["edgelm"][0].get("info") if "edgelm" in runs else None,
        "sizes_mib": {"peer": pfile.stat().st_size / 2**20,
                      "edgelm": bundle.stat().st_size / 2**20 if bundle else None},
        "metrics": {},
    }
    for m in METRICS:
        entry = {"peer": summarize([r.get(m) for r in runs["peer"]])}
        if "edgelm" in runs:
            entry["edgelm"] = summarize([r.get(m) for r in runs["edgelm"]])
            ratios = [e[m] / p[m] for e, p in zip(runs["edgelm"], runs["peer"])
                      if e.get(m) is not None and p.get(m)]
            entry["ratio"] = summarize(ratios)
        res["metrics"][m] = entry
    if a.raw:
        res["runs"] = runs
    return res


def fmt_table(results: list[dict]) -> str:
    lines = []
    hdr = f"{'pair':<56} {'metric':<14} {'edgelm':>18} {'peer':>18} {'edgelm/peer':>24}"
    lines.append(hdr)
    lines.append("-" * len(hdr))

    def cell(s, nd):
        if not s:
            return "-"
        return f"{s['median']:.{nd}f}"

    for res in results:
        first = True
        for m, (label, higher) in METRICS.items():
            e = res["metrics"][m]
            if not e["peer"] and not e.get("edgelm"):
                continue
            nd = 3 if m in ("ttft_s", "init_s") else (0 if m == "peak_rss_mib" else 1)
            rs = e.get("ratio")
            rtxt = "-" if not rs else f"{rs['median']:.2f}x ({rs['min']:.2f}-{rs['max']:.2f})"
            arrow = "↑" if higher else "↓"
            lines.append(f"{res['pair'] if first else '':<56} {label + ' ' + arrow:<14} "
                         f"{cell(e.get('edgelm'), nd):>18} {cell(e['peer'], nd):>18} {rtxt:>24}")
            first = False
        sz = res["sizes_mib"]
        lines.append(f"{'':<56} {'size MiB':<14} {sz['edgelm'] or 0:>18.1f} {sz['peer']:>18.1f}")
    lines.append(f"(medians of {results[0]['rounds'] if results else 0} alternating rounds; ratio = "
                 "edgelm/peer per round, median (min-max); ↑ higher is better, ↓ lower is better)")
    return "\n".join(lines)


def parse_pairs(a) -> list[tuple[str, str, str]]:
    out = []
    if a.pair:
        for spec in a.pair:
            peer, rest = spec.split(":", 1)
            pm, scheme = rest.split("=", 1)
            out.append((peer, pm, scheme))
        return out
    if a.peer in ("llama", "all"):
        out += [("llama", pm, s) for pm, s in LLAMA_PAIRS]
    if a.peer in ("litert", "all"):
        out += [("litert", pm, s) for pm, s in LITERT_PAIRS]
        if a.with_4096:
            out.append(("litert", "int8_kv4096", "int8"))
    return out


def _git_rev() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) or None
    except Exception:
        return None


def host_info() -> dict:
    """The host's CPU model and its SIMD flags, and the build edgelm picks on it, recorded with
    every result: figures from AVX2-only and AVX-512 VNNI hosts must never be mixed."""
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_int8")
    try:
        from edgelm.backends import native

        isa = native._default().isa if native.available() else None
    except Exception:
        isa = None
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count(), "edgelm_isa": isa,
            "edgelm_isa_forced": os.environ.get("EDGELM_ISA") or None}


def main(argv=None) -> int:
    # SIGTERM -> SystemExit, so run_child kills the running benchmark child instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["llama", "litert", "all"], default="all")
    ap.add_argument("--pair", action="append",
                    help="PEER:PEER_MODEL=EDGELM_SCHEME, e.g. llama:Q4_0=int4-b32 (repeatable)")
    ap.add_argument("--embed-scheme", default=None,
                    help="edgelm embedding/head scheme (default: the peer's: int8 for llama Q4_0/Q8_0 "
                         "(int8-b32 for the int8-b32 pair), the linear scheme for LiteRT pairs, whose "
                         "int4 exports quantize the head too)")
    ap.add_argument("-r", "--repeats", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--gen", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=1280, help="edgelm KV capacity (LiteRT: per export)")
    ap.add_argument("--with-4096", action="store_true", help="also LiteRT int8 cache-4096 vs edgelm --max-tokens 4096")
    ap.add_argument("--edgelm-args", default="",
                    help="extra `edgelm bench` arguments, e.g. --edgelm-args='--attn-precision bf16'")
    ap.add_argument("--llama-args", default="",
                    help="extra llama-bench arguments, e.g. --llama-args='--poll 0' (threads sleep instead of spinning: "
                         "far less collapse when the host is oversubscribed; default: none, as in peers.md)")
    ap.add_argument("--only-peer", action="store_true", help="run the peer side alone (no ratios)")
    ap.add_argument("--reconvert", action="store_true", help="reconvert the edgelm bundles")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--raw", action="store_true", help="include every run's raw numbers in the JSON")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--show", metavar="JSON", help="print the table of a saved --out/--json file and exit")
    a = ap.parse_args(argv)
    if a.show:
        doc = json.loads(Path(a.show).read_text())
        print(f"# {doc.get('command')}  ({doc.get('date_utc')})")
        if doc.get("host"):
            h = doc["host"]
            print(f"# host: {h.get('cpu')}, {h.get('cores')} cores, {' '.join(h.get('flags', []))}; "
                  f"edgelm build {h.get('edgelm_isa')}")
        print(fmt_table(doc["results"]))
        return 0
    results = []
    doc = {"command": " ".join(["python benchmarks/compare.py"] + (argv if argv is not None else sys.argv[1:])),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "edgelm_git": _git_rev(),
           "host": host_info(), "results": results}
    for peer, pm, scheme in parse_pairs(a):
        results.append(compare_pair(peer, pm, scheme, a))
        if a.out:  # after every pair, so an interrupted run keeps what it measured
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(doc, indent=2))
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        h = doc["host"]
        print(f"# host: {h['cpu']}, {h['cores']} cores, {' '.join(h['flags'])}; edgelm build {h['edgelm_isa']}")
        print(fmt_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
