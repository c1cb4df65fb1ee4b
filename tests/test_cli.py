"""The CLI end to end: the default model on first use, convert, inspect, and bad input."""

import hashlib
import json

import pytest

from .conftest import assert_clean_error, run_cli

pytestmark = pytest.mark.slow


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_default_model_prepares_then_reuses(tmp_path):
    env = {"EDGELM_CACHE": str(tmp_path / "cache")}
    p = run_cli("run", "The capital of France is", "-n", "8", "--temperature", "0", env=env)
    assert p.returncode == 0, p.stderr
    assert "preparing the default model" in p.stderr
    assert len(p.stdout.strip()) > 0
    assert "decode" in p.stderr and "tok/s" in p.stderr
    bundles = list((tmp_path / "cache").glob("*.edgelm"))
    assert len(bundles) == 1
    mtime = bundles[0].stat().st_mtime_ns
    p2 = run_cli("run", "The capital of France is", "-n", "8", "--temperature", "0", env=env)
    assert p2.returncode == 0, p2.stderr
    assert "preparing" not in p2.stderr
    assert p2.stdout == p.stdout  # greedy is deterministic
    assert bundles[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    # the same seed gives the same sampled text
    a = run_cli("run", "Once upon a time", "-n", "12", "--seed", "7", "--temperature", "1.0", env=env)
    b = run_cli("run", "Once upon a time", "-n", "12", "--seed", "7", "--temperature", "1.0", env=env)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


def test_convert_and_inspect(tmp_path, real_gguf):
    before = _sha(real_gguf)
    out = tmp_path / "m.int4.edgelm"
    # quiet, and a cheap scheme: the int4 conversion below then replaces an existing bundle
    p = run_cli("convert", real_gguf, "-o", out, "--scheme", "int8", "--embed-scheme", "int8", "-q")
    assert p.returncode == 0, p.stderr
    assert "bits/weight" not in p.stdout
    p = run_cli("convert", real_gguf, "-o", out, "--scheme", "int4-b32", "--embed-scheme", "int8")
    assert p.returncode == 0, p.stderr
    assert "int4-b32" in p.stdout and "int8" in p.stdout and "bits/weight" in p.stdout
    assert _sha(real_gguf) == before  # the source is never modified
    assert not list(tmp_path.glob("*.tmp"))

    p = run_cli("inspect", out)
    assert p.returncode == 0, p.stderr
    for needle in ("arch        gemma3", "blk.0.attn_q.weight", "token_embd.weight", "int4-b32", "bits/weight",
                   "LLLLLG", "tokenizer"):
        assert needle in p.stdout, needle
    j = json.loads(run_cli("inspect", out, "--json").stdout)
    assert j["header"]["quantization"] == {"scheme": "int4-b32", "embed_scheme": "int8", "requantize": False}
    schemes = {t["name"]: t["scheme"] for t in j["tensors"]}
    assert schemes["token_embd.weight"] == "int8"
    assert schemes["blk.3.ffn_down.weight"] == "int4-b32"
    assert schemes["blk.3.attn_norm.weight"] == "fp32"
    assert 4.5 < j["bits_per_weight"] < 8.5


def _tiny_gguf(path, arch, **fields):
    """A GGUF with one block, `fields` (GGUFWriter add_* names without the prefix, e.g.
    head_count=0) and a zero embedding table."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name, value in fields.items():
        getattr(w, f"add_{name}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_bad_inputs(tmp_path):
    out = tmp_path / "o.edgelm"
    assert_clean_error(run_cli("convert", tmp_path / "missing.gguf", "-o", out), "missing.gguf", "no such file")
    bad_arch = tmp_path / "llama.gguf"
    _tiny_gguf(bad_arch, "llama")
    assert_clean_error(run_cli("convert", bad_arch, "-o", out), "llama.gguf", "architecture 'llama' is not supported")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 10)
    assert_clean_error(run_cli("convert", garbage, "-o", out), "garbage.gguf", "not a GGUF file")
    truncated = tmp_path / "trunc.gguf"
    _tiny_gguf(truncated, "gemma3")
    truncated.write_bytes(truncated.read_bytes()[:60])
    assert_clean_error(run_cli("convert", truncated, "-o", out), "trunc.gguf")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "model.safetensors").write_bytes(b"")
    assert_clean_error(run_cli("convert", hf_dir, "-o", out), "config.json")
    assert not out.exists()


def test_convert_bad_scheme(tmp_path, real_gguf):
    assert_clean_error(run_cli("convert", real_gguf, "-o", tmp_path / "x.edgelm", "--scheme", "int3"), "int3")


def test_run_bad_inputs(tmp_path, real_fp32_bundle):
    m = real_fp32_bundle
    assert_clean_error(run_cli("run", "hi", "--model", tmp_path / "nope.edgelm"), "nope.edgelm", "no such file")
    assert_clean_error(run_cli("run", "hi", "--model", m, "--temperature", "-1"), "temperature")
    assert_clean_error(run_cli("run", "hi", "--model", m, "--top-p", "1.5"), "top_p")
    assert_clean_error(run_cli("run", "hi", "--model", m, "--threads", "0"), "threads")
    long_prompt = "word " * 200
    p = run_cli("run", long_prompt, "--model", m, "--max-tokens", "64", "-n", "4")
    assert_clean_error(p, "capacity is 64")
    assert p.returncode == 4
