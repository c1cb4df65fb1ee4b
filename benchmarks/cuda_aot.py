"""Compile the CUDA backend's Triton kernels for a GPU architecture without a GPU, and report
each specialization's registers, spills (local memory) and shared memory.

Triton compiles ahead of time with the ptxas it ships, so the real compiler (not the
interpreter) checks every kernel specialization the backend launches: dot shapes, loop
bounds, types. Register counts are the one performance proxy available without a device:
a GEMV that needs 250 registers a thread runs two blocks per SM.

    python benchmarks/cuda_aot.py [--arch 90] [--json]

Must run without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# scheme id -> (q pointer type, scale pointer type), as DeviceWeight stores them
PARTS = {0: ("*fp32", "*fp32"), 1: ("*fp16", "*fp16"), 2: ("*i8", "*fp32"), 3: ("*i8", "*fp16"),
         4: ("*u8", "*fp16"), 5: ("*u8", "*fp16")}
BLOCK = {0: 1, 1: 1, 2: 1, 3: 32, 4: 32, 5: 128}


def specializations(sample: bool = False):
    """(label, kernel name, {arg: type}, {constexpr: value}, {num_warps, num_stages}) for every
    config the backend's autotuners may pick."""
    import edgelm.backends.cuda_kernels as K

    def opts(c):
        return {"num_warps": c.num_warps, "num_stages": c.num_stages}

    out = []
    for sid, (qt, st) in PARTS.items():
        rows = (1, 16) if sample and sid in (0, 3, 4) else (() if sample else (1, 2, 4, 16, 64))
        sig = {"x_ptr": "*fp32", "q_ptr": qt, "s_ptr": st, "q2_ptr": qt, "s2_ptr": st, "out_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32", "sxm": "i32", "som": "i32"}
        for m in rows:
            bm, dot = K._mm_rows(m)
            for c in (K.DOT_CONFIGS if dot else K.GEMV_CONFIGS):
                for dual in (False, True):
                    cst = {"SCHEME": sid, "BS": BLOCK[sid], "DUAL": dual, "BM": bm, "DOT": dot} | c.kwargs
                    tiles = " ".join(f"{k}{v}" for k, v in c.kwargs.items())
                    out.append((f"qmm s{sid} rows{m} {tiles} w{c.num_warps}{' dual' if dual else ''}", "_qmm_kernel",
                                sig, cst, opts(c)))
        out.append((f"embed s{sid}", "_embed_kernel",
                    {"ids_ptr": "*i32", "q_ptr": qt, "s_ptr": st, "out_ptr": "*fp32", "N": "i32", "K": "i32"},
                    {"SCHEME": sid, "BS": BLOCK[sid], "BK": 1024}, {}))
    for bd in (1024, 2048):
        for add, nxt in ((False, False), (True, False), (True, True)):
            out.append((f"rmsnorm D{bd} add={add} next={nxt}", "_rmsnorm_kernel",
                        {"x_ptr": "*fp32", "h_ptr": "*fp32", "w_ptr": "*fp32", "w2_ptr": "*fp32", "out_ptr": "*fp32",
                         "nxt_ptr": "*fp32", "D": "i32", "eps": "fp32"}, {"ADD": add, "NEXT": nxt, "BD": bd}, {}))
    for norm in (False, True):
        out.append((f"rope norm={norm}", "_rope_kernel",
                    {"x_ptr": "*fp32", "w_ptr": "*fp32", "pos_ptr": "*i64", "inv_ptr": "*fp32", "out_ptr": "*fp32",
                     "H": "i32", "HD": "i32", "eps": "fp32"}, {"NORM": norm, "BH": 128}, {}))
    for kv in ("*fp16", "*fp32"):
        out.append((f"kv_write {kv[1:]}", "_kv_write_kernel",
                    {"k_ptr": "*fp32", "v_ptr": "*fp32", "kc_ptr": kv, "vc_ptr": kv, "pos_ptr": "*i64", "dpos_ptr": "*i64",
                     "len_ptr": "*i32", "slots": "i32", "W": "i32"}, {"BW": 256}, {}))
    out.append(("attn_combine", "_attn_combine_kernel",
                {"part_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": "*fp32", "S": "i32", "R": "i32", "HD": "i32"},
                {"BS": 32, "BD": 256}, {}))
    out.append(("gelu_mul", "_gelu_mul_kernel", {"g_ptr": "*fp32", "u_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
                {"B": 1024}, {}))
    seen: dict = {}
    for kv16 in (True, False):
        kv = "*fp16" if kv16 else "*fp32"
        for rows, hd in ((4, 256), (512, 256), (8, 128), (32, 128), (512, 128)):
            bm = K._attn_rows(rows, hd, kv16)
            if (bm, hd) not in seen.setdefault(kv16, set()):
                seen[kv16].add((bm, hd))
                split, has_len, softcap = bm == 16, bm == 16, hd == 128
                base = {"HAS_LEN": has_len, "SOFTCAP": softcap, "SPLIT": split, "KV16": kv16, "BM": bm, "BD": hd}
                for c in K._attn_prune(K.ATTN_CONFIGS, {}, **base):
                    sig = {"q_ptr": "*fp32", "k_ptr": kv, "v_ptr": kv, "qpos_ptr": "*i64", "kpos_ptr": "*i64",
                           "len_ptr": "*i32", "o_ptr": "*fp32", "ml_ptr": "*fp32", "n": "i32", "T": "i32", "G": "i32",
                           "KV": "i32", "HD": "i32", "span": "i32", "window": "i32", "scale": "fp32", "softcap": "fp32"}
                    out.append((f"attn kv={kv[1:]} bm{bm} hd{hd} BN{c.kwargs['BN']} w{c.num_warps} s{c.num_stages}",
                                "_attn_kernel", sig, base | c.kwargs, opts(c)))
    return out


def compile_all(arch: int = 90, only: str | None = None, sample: bool = False) -> list[dict]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("cuda_aot.py compiles for a GPU: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import edgelm.backends.cuda_kernels as K

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", arch, 32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, sig, cst, opt in specializations(sample):
            if only and only not in label:
                continue
            full = dict(sig) | {k: "constexpr" for k in cst}
            order = list(getattr(K, name).arg_names)
            full = {k: full[k] for k in order}
            src = ASTSource(fn=getattr(K, name), signature=full,
                            constexprs={(order.index(k),): v for k, v in cst.items()})
            row = {"kernel": label}
            try:
                c = triton.compile(src, target=target, options=opt)
            except Exception as e:  # a compile error is the finding: report it, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows.append(row)
                continue
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(c.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True).stdout
            fields = dict(f.split(":", 1) for f in usage.split() if ":" in f and f.split(":", 1)[1].isdigit())
            row.update(regs=int(fields.get("REG", -1)), local=int(fields.get("LOCAL", -1)),
                       stack=int(fields.get("STACK", -1)), shared=int(c.metadata.shared), warps=c.metadata.num_warps)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    ap.add_argument("--only", default=None, help="only the specializations whose label contains this")
    ap.add_argument("--sample", action="store_true",
                    help="every kernel, but the products of three schemes at 1 and 16 rows only (the test suite's run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = compile_all(args.arch, args.only, args.sample)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            if "error" in r:
                print(f"{r['kernel']:<58} ERROR {r['error']}")
            else:
                print(f"{r['kernel']:<58} regs {r['regs']:>3}  local {r['local']:>4}  shared {r['shared']:>6}  "
                      f"warps {r['warps']}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
