"""`edgelm bench`: the seed's columns as JSON and table, synthetic labelling, bad arguments."""

import json

import pytest

from .conftest import assert_clean_error, run_cli
from .tiny_bundle import tiny_bundle


def test_bench_json_columns():
    m = tiny_bundle()
    p = run_cli("bench", "--model", m, "-p", "16", "-n", "8", "--repeat", "2", "--max-tokens", "64", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["synthetic"] is False and r["capacity"] == 64 and r["repeats"] == 2
    assert r["prompt_tokens"] == 16 and r["gen_tokens"] == 8 and r["model_bytes"] > 0
    assert r["backend"] in ("cpu", "numpy") and r["scheme"]
    m_ = r["metrics"]
    for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "init_s", "decode_gb_s"):
        s = m_[k]
        assert len(s["values"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["min"] > 0, k
    assert m_["peak_rss_mib"] > 10
    if r["backend"] == "cpu":  # one probe after each measured run, each run's % against its own probe
        assert r["stream_read_gb_s"] > 0.1
        probes, pct = m_["stream_read_gb_s"]["values"], m_["decode_pct_of_bound"]["values"]
        assert len(probes) == 2 and r["stream_read_gb_s"] == pytest.approx(sorted(probes)[0] / 2 + sorted(probes)[1] / 2)
        for g, b, q in zip(m_["decode_gb_s"]["values"], probes, pct):
            assert q == pytest.approx(100 * g / b)
    # GB/s is bytes per token x tok/s
    assert m_["decode_gb_s"]["median"] == pytest.approx(
        r["bytes_per_token"] * sorted(m_["decode_tok_s"]["values"])[0] / 1e9, rel=1.0)


def test_bench_kv_dtype_and_prefill_chunk():
    m = tiny_bundle()
    base = ("bench", "--model", m, "-p", "16", "-n", "4", "--repeat", "1", "--max-tokens", "64", "--no-probe", "--json")
    r16 = json.loads(run_cli(*base).stdout)
    r32 = json.loads(run_cli(*base, "--kv-dtype", "f32", "--prefill-chunk", "5").stdout)
    assert r32["kv_dtype"] == "f32" and r32["prefill_chunk"] == 5
    if r16["backend"] == "cpu":
        assert r16["kv_dtype"] == "f16"  # the cpu default
        # the K/V bytes read per decoded token halve: bytes(f32) - bytes(f16) = the f16 K/V bytes
        kv16 = r32["bytes_per_token"] - r16["bytes_per_token"]
        assert kv16 > 0 and (r16["bytes_per_token"] - kv16) > 0
    assert_clean_error(run_cli(*base, "--prefill-chunk", "0"), "--prefill-chunk")
    assert run_cli(*base, "--kv-dtype", "f8").returncode == 2


def test_bench_table():
    p = run_cli("bench", "--model", tiny_bundle(), "-p", "8", "-n", "4", "--repeat", "1", "--max-tokens", "32")
    assert p.returncode == 0, p.stderr
    for col in ("prefill tok/s", "decode tok/s", "time to first token", "init s", "peak CPU RSS", "model size",
                "context capacity", "GB/s"):
        assert col in p.stdout, col


def test_bench_no_probe_skips_the_bandwidth_child():
    """--no-probe (what benchmarks/compare.py passes) skips the probe child, whose 512 MiB
    buffer a parent's wait4 ru_maxrss would count as edgelm's."""
    for flag, has_probe in (((), True), (("--no-probe",), False)):
        p = run_cli("bench", "--model", tiny_bundle(), "-p", "8", "-n", "4", "--repeat", "1", "--max-tokens", "32",
                    "--json", *flag)
        assert p.returncode == 0, p.stderr
        r = json.loads(p.stdout)
        if r["backend"] == "cpu":
            assert (r["stream_read_gb_s"] is not None) == has_probe


@pytest.mark.slow
def test_bench_synthetic_is_labelled(tmp_path):
    env = {"EDGELM_CACHE": str(tmp_path)}
    p = run_cli("bench", "--synthetic", "gemma3-270m", "-p", "8", "-n", "4", "--repeat", "1", "--max-tokens", "32",
                "--json", env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["synthetic"] is True and r["synthetic_geometry"] == "gemma3-270m"
    assert r["scheme"] == "int4-b32" and r["embed_scheme"] == "int8"
    p = run_cli("bench", "--synthetic", "gemma3-270m", "-p", "8", "-n", "4", "--repeat", "1", "--max-tokens", "32",
                env=env)
    assert "SYNTHETIC" in p.stdout


def test_bench_bad_arguments():
    m = tiny_bundle()
    assert_clean_error(run_cli("bench", "--model", m, "-p", "60", "-n", "8", "--max-tokens", "64"), "exceeds --max-tokens")
    assert_clean_error(run_cli("bench", "--model", m, "--repeat", "0"), "--repeat")
    assert_clean_error(run_cli("bench", "--model", m, "--synthetic", "gemma3-1b"), "either --model or --synthetic")
