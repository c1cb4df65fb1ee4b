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


# ----------------------------------------------------------------------------- towers

MEDIA_KEYS = ("image_encode_ms", "audio_encode_ms_per_s", "audio_encode_s", "ttft_image_s", "towers_idle_rss_mib",
              "peak_rss_media_mib")
MEDIA_ROWS = ("image encode ms (256 px)", "image encode ms (512 px)", "image encode ms (768 px)",
              "audio encode ms per audio s", "TTFT s, 1 image", "tower weights MiB", "towers idle RSS MiB",
              "peak CPU RSS MiB, with media")


def _mm_bundle():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from timm_support import need_timm

    need_timm()
    from gemma3n_fixtures import tiny_mm_bundle

    return tiny_mm_bundle()[0]


def test_bench_tower_columns():
    """A bundle with both towers gets the media columns: image encode ms at 256/512/768 px,
    audio ms per second of a 10 s clip, TTFT of an image + 32 tokens, the towers' bytes and
    the RSS their load adds (mmap-backed: a small fraction of their bytes)."""
    import math

    from edgelm.bench import IMAGE_SIZES, bench, format_table
    from edgelm.format.bundle import Bundle

    path = _mm_bundle()
    r = bench(path, 8, 4, repeat=1, max_tokens=32, progress=False, probe=False)
    r = json.loads(json.dumps(r))  # what --json prints
    m = r["metrics"]
    assert r["towers"] == ["vision", "audio"] and r["image_sizes"] == [256, 512, 768] and r["audio_seconds"] == 10
    assert r["media_capacity"] >= 256 + 32  # raised from --max-tokens 32 to hold the image and the text
    for size in IMAGE_SIZES:
        s = m["image_encode_ms"][str(size)]
        assert len(s["values"]) == 1 and 0 < s["median"] < math.inf, size
    for k in ("audio_encode_ms_per_s", "audio_encode_s", "ttft_image_s"):
        assert 0 < m[k]["median"] < math.inf and len(m[k]["values"]) == 1, k
    assert m["audio_encode_ms_per_s"]["median"] == pytest.approx(1e3 * m["audio_encode_s"]["median"] / 10)
    with Bundle(path) as b:
        tb = sum(b.tensor(n).nbytes for n in b.tensor_names() if n.startswith(("v.", "a.", "mm.")))
        text = sum(b.tensor(n).nbytes for n in b.tensor_names()) - tb
    assert r["tower_bytes"] == tb > 0 and tb < r["model_bytes"]
    # decode reads no tower weight: bytes per token stays under the text weights plus a KV cache
    assert r["bytes_per_token"] < text + (4 << 20)
    idle = m["towers_idle_rss_mib"]
    assert idle is not None and math.isfinite(idle) and idle < tb / 2**20 / 2, (idle, tb)
    assert m["peak_rss_media_mib"] >= m["peak_rss_mib"] > 0
    table = format_table(r)
    for row in MEDIA_ROWS:
        assert row in table, row


def test_bench_text_only_has_no_tower_columns():
    from edgelm.bench import bench, format_table

    r = bench(tiny_bundle(), 8, 4, repeat=1, max_tokens=32, progress=False, probe=False)
    for k in MEDIA_KEYS:
        assert k not in r["metrics"], k
    for k in ("towers", "tower_bytes", "media_capacity"):
        assert k not in r, k
    table = format_table(r)
    for row in MEDIA_ROWS:
        assert row not in table, row


def test_synthetic_gemma3n_towers_have_the_real_geometry():
    import math

    from edgelm.convert.common import plan_tensors
    from edgelm.convert.synthetic import has_towers, synthetic_config, synthetic_source
    from edgelm.models import gemma3n
    from edgelm.models._gemma3n_audio import AudioConfig
    from edgelm.models._mobilenetv5 import VisionConfig

    for name in ("gemma3n-e2b", "gemma3n-e4b"):
        assert has_towers(name)
        _, text_cfg = synthetic_config(name)
        assert text_cfg.get("vision") is None and text_cfg.get("audio") is None  # off by default
        assert not any(st.name.startswith(("v.", "a.", "mm.")) for st in synthetic_source(name).tensors)
        src = synthetic_source(name, towers=True)
        cfg = gemma3n.Config.from_dict(src.config)
        v, a = cfg.vision, cfg.audio
        assert (v.token_id, v.begin_id, v.end_id, v.vocab_offset, v.vocab_size, v.soft_tokens, v.hidden_size) == \
            (262_145, 255_999, 262_144, 262_144, 128, 256, 2048)
        assert (a.token_id, a.begin_id, a.end_id, a.vocab_offset, a.vocab_size, a.soft_tokens, a.hidden_size) == \
            (262_273, 256_000, 262_272, 262_272, 128, 188, 1536)
        assert v.tower == VisionConfig.from_hf({}) and a.tower == AudioConfig.from_hf({})
        assert v.preprocess == {} == a.preprocess and v.eps == 1e-6 == a.eps
        shapes = {st.name: st.shape for st in src.tensors}
        assert shapes == {k: s for k, (s, _) in gemma3n.tensor_shapes(cfg).items()}
        params = {p: sum(math.prod(s) for n, s in shapes.items() if n.startswith(p)) for p in ("v.", "a.", "mm.")}
        assert params["v."] == 294_126_912  # mobilenetv5_300m_enc
        assert params["a."] == 681_348_640  # the USM conformer, 12 layers of width 1536
        assert params["mm."] == 128 * 2048 + 2 * 2048 + 2048 * 2048 + 128 * 1536 + 2 * 1536 + 2048 * 1536
        assert shapes["v.stem.weight"] == (64, 27) and shapes["v.blk.3.dw_mid.weight"] == (768, 5, 5)
        assert shapes["a.blk.11.ffw_end.up.weight"] == (6144, 1536) and shapes["mm.v.proj"] == (2048, 2048)
        assert all(len(s) in (1, 2, 3) for n, s in shapes.items() if n.startswith(("v.", "a.", "mm.")))
        plans = {p.name: p.scheme.name for p in plan_tensors(src, "int4-b32", "int8", None, "int8")}
        assert plans["a.blk.0.attn.q.weight"] == plans["mm.a.proj"] == "int8"
        assert plans["v.blk.3.dw_mid.weight"] == plans["a.blk.0.conv.dw.weight"] == "fp32"


def test_synthetic_tower_tensors_convert(tmp_path):
    """A few tower tensors of the real geometry (a k x k conv, a 3-D depthwise kernel, the
    audio query scale, a bias, an embedder projection) convert through the any-scheme
    passthrough with sensible scales."""
    import dataclasses

    import numpy as np

    from edgelm.convert import convert
    from edgelm.convert.synthetic import synthetic_source
    from edgelm.format.bundle import Bundle

    src = synthetic_source("gemma3n-e2b", towers=True)
    keep = ("v.stem.weight", "v.stem.bias", "v.blk.3.dw_mid.weight", "a.blk.0.attn.q_scale", "a.blk.0.conv.dw.weight",
            "mm.v.proj", "output_norm.weight")
    src = dataclasses.replace(src, tensors=[st for st in src.tensors if st.name in keep])
    out = tmp_path / "few.edgelm"
    convert(src, out, scheme="int4-b32", embed_scheme="int8", tower_scheme="int8", progress=False)
    with Bundle(out) as b:
        assert b.header["quantization"]["tower_scheme"] == "int8"
        assert b.tensor("v.stem.weight").scheme.name == "int8" and b.tensor("mm.v.proj").scheme.name == "int8"
        dw = b.tensor("v.blk.3.dw_mid.weight")
        assert dw.scheme.name == "fp32" and tuple(dw.shape) == (768, 5, 5)
        w = np.asarray(dw.parts["w"]).reshape(768, 5, 5)
        assert np.isfinite(w).all() and 0.1 < float(w.std()) < 0.3  # 1 / sqrt(25)
        q = np.asarray(b.tensor("a.blk.0.attn.q_scale").parts["w"])
        assert q.shape == (192,) and abs(float(q.mean()) - 192 ** -0.5) < 0.01  # head_dim^-0.5, not 1
        assert abs(float(np.asarray(b.tensor("v.stem.bias").parts["w"]).mean())) < 0.01
        assert abs(float(np.asarray(b.tensor("output_norm.weight").parts["w"]).mean()) - 1) < 0.01


def test_bench_tower_scheme_option():
    p = run_cli("bench", "--synthetic", "gemma3n-e2b", "--tower-scheme", "int4", "--json")
    assert p.returncode == 2 and "--tower-scheme" in p.stderr
