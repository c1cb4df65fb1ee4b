"""`edgelm imatrix` and `convert --imatrix`: activation statistics, their file, and their use
by the int4 scale search."""

import json

import numpy as np
import pytest

from edgelm.convert import convert, load_source
from edgelm.errors import BadInputError, FormatError
from edgelm.runtime import imatrix as im
from edgelm.runtime.engine import Engine

from . import hf_fixtures as fx
from .conftest import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix")
    hf = fx.make_tiny_gemma3(root / "hf", seed=5, layers=2, sliding_window=8, hidden_size=128,
                             intermediate_size=256)
    fp32 = root / "fp32.edgelm"
    convert(load_source(hf), fp32, scheme="fp32", progress=False)
    return {"hf": hf, "fp32": fp32, "root": root}


def _manual_stats(eng, seqs):
    """E[a^2] of the first layer's q/k/v input, computed independently with the numpy ops."""
    from edgelm.backends.numpy_ops import NumpyOps

    ops = NumpyOps()
    cfg, w = eng.config, eng.weights
    rows = []
    for seq in seqs:
        x = ops.embed(np.asarray(seq), w.embed) * np.float32(cfg.hidden_size ** 0.5)
        rows.append(ops.rmsnorm(x, w.layers[0].attn_norm, cfg.rms_norm_eps))
    a = np.concatenate(rows).astype(np.float64)
    return (a ** 2).mean(axis=0)


def test_collect_records_every_linear_input(tiny):
    eng = Engine(tiny["fp32"], backend="numpy", max_tokens=64)
    seqs = im.text_calibration(eng, "The quick brown fox jumps over the lazy dog. " * 20, n_tokens=100, seq_len=40)
    assert all(s[0] == eng.tokenizer.bos_id and len(s) <= 40 for s in seqs)
    data = im.collect(eng, seqs)
    linear = {n for n in eng.bundle.tensor_names() if len(eng.bundle.tensor(n).shape) == 2}
    assert set(data) == linear  # every projection and the tied head (token_embd)
    for n, v in data.items():
        assert v.dtype == np.float32 and v.ndim == 1 and np.all(np.isfinite(v)) and np.all(v >= 0), n
    # q, k and v share one input; so do gate and up
    np.testing.assert_array_equal(data["blk.0.attn_q.weight"], data["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(data["blk.1.ffn_gate.weight"], data["blk.1.ffn_up.weight"])
    np.testing.assert_allclose(data["blk.0.attn_q.weight"], _manual_stats(eng, seqs), rtol=1e-5)
    assert eng.ops.name == "numpy"  # the engine's op table is never replaced


def test_self_generated_calibration_is_reproducible(tiny):
    eng = Engine(tiny["fp32"], max_tokens=64)
    a = im.self_generated_calibration(eng, n_tokens=50, seq_len=20, seed=3)
    b = im.self_generated_calibration(eng, n_tokens=50, seq_len=20, seed=3)
    c = im.self_generated_calibration(eng, n_tokens=50, seq_len=20, seed=4)
    assert a == b and a != c
    assert sum(len(s) for s in a) == 50 and all(s[0] == eng.tokenizer.bos_id for s in a)


def _linear_tensors(bundle_path) -> set[str]:
    from edgelm.format.bundle import Bundle

    with Bundle(bundle_path) as b:
        return {n for n in b.tensor_names() if len(b.tensor_info(n)["shape"]) == 2}


def test_cli_imatrix_records_every_linear_tensor_on_both_backends(tiny, tmp_path):
    """The default cpu backend runs prefill through fused native blocks; the recorder must
    still see every product, and record what the numpy reference records."""
    linear = _linear_tensors(tiny["fp32"])
    assert len(linear) == 2 * 7 + 1  # q k v o gate up down per layer, and the tied head
    got = {}
    for backend in ("cpu", "numpy"):
        out = tmp_path / f"im-{backend}.npz"
        r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(out), "--tokens", "48", "--seed", "2",
                    "--backend", backend, "-q")
        assert r.returncode == 0, r.stderr
        got[backend], _ = im.load(out)
        assert set(got[backend]) == linear, (backend, linear ^ set(got[backend]))
        for name, v in got[backend].items():
            # a real mean square: positive, finite and not the same for every column
            assert np.all(np.isfinite(v)) and v.mean() > 0 and v.std() > 0, (backend, name)
    for name in linear:  # the same statistics, up to the backends' rounding
        np.testing.assert_allclose(got["cpu"][name], got["numpy"][name], rtol=2e-2, atol=1e-6, err_msg=name)


def test_convert_refuses_a_partial_importance_matrix(tiny, tmp_path):
    out = tmp_path / "im.npz"
    r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(out), "--tokens", "32", "-q")
    assert r.returncode == 0, r.stderr
    data, meta = im.load(out)
    partial = tmp_path / "partial.npz"
    im.save(partial, {k: v for k, v in data.items() if k != "blk.1.ffn_down.weight"}, meta)
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "p.edgelm"), "-s", "int4-b32",
                "--imatrix", str(partial), "-q")
    assert_clean_error(r, "covers 14 of the 15 tensors quantized to 4 bits; missing: blk.1.ffn_down.weight")
    assert not (tmp_path / "p.edgelm").exists()
    # int8 does not use the importance, so nothing is missing there; an int8 head with int4
    # layers needs every layer but not the head
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "q.edgelm"), "-s", "int8",
                "--imatrix", str(partial), "-q")
    assert r.returncode == 0, r.stderr
    no_head = tmp_path / "nohead.npz"
    im.save(no_head, {k: v for k, v in data.items() if k != "token_embd.weight"}, meta)
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "r.edgelm"), "-s", "int4-b32",
                "--embed-scheme", "int8", "--imatrix", str(no_head), "-q")
    assert r.returncode == 0, r.stderr


def test_cli_imatrix_then_convert(tiny, tmp_path):
    out = tmp_path / "im.npz"
    r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(out), "--tokens", "64", "--seed", "1", "-q")
    assert r.returncode == 0, r.stderr
    data, meta = im.load(out)
    assert meta["self_generated"] is True and meta["tokens"] == 64 and meta["seed"] == 1
    assert set(data) == _linear_tensors(tiny["fp32"])
    bundle = tmp_path / "q.edgelm"
    r = run_cli("convert", str(tiny["hf"]), "-o", str(bundle), "-s", "int4-b32", "--imatrix", str(out), "-q")
    assert r.returncode == 0, r.stderr
    eng = Engine(bundle, max_tokens=64)
    assert eng.bundle.meta["quantization"]["importance"]["file"] == "im.npz"
    # the importance-weighted search does at least as well on the weighted error, tensor by tensor
    plain = tmp_path / "plain.edgelm"
    convert(load_source(tiny["hf"]), plain, scheme="int4-b32", progress=False)
    ref = Engine(tiny["fp32"], max_tokens=64).bundle
    pe = Engine(plain, max_tokens=64).bundle
    for name, imp in data.items():
        if name not in eng.bundle or eng.bundle.tensor(name).scheme.name != "int4-b32":
            continue
        w = ref.tensor(name).dequantize()
        werr = lambda b: float((((w - b.tensor(name).dequantize()) ** 2) * (imp / imp.mean() + 1e-3)).sum())  # noqa: E731
        assert werr(eng.bundle) <= werr(pe) * (1 + 1e-6), name


def test_bad_importance_files(tiny, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(FormatError, match="not an edgelm importance"):
        im.load(bad)
    with pytest.raises(BadInputError, match="no such importance file"):
        im.load(tmp_path / "missing.npz")
    neg = tmp_path / "neg.npz"
    np.savez(neg, **{"blk.0.attn_q.weight": -np.ones(128, np.float32)})
    with pytest.raises(FormatError, match="negative or non-finite"):
        im.load(neg)
    other = tmp_path / "other.npz"
    im.save(other, {"blk.0.attn_q.weight": np.ones(77, np.float32)}, {"model": "x"})
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "x.edgelm"), "-s", "int4-b32",
                "--imatrix", str(other), "-q")
    assert_clean_error(r, "has 77 entries")
    assert not (tmp_path / "x.edgelm").exists()
    stranger = tmp_path / "stranger.npz"
    im.save(stranger, {"nothing.like.this": np.ones(4, np.float32)}, {})
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "y.edgelm"), "-s", "int4-b32",
                "--imatrix", str(stranger), "-q")
    assert_clean_error(r, "names none of this model's tensors")
    r = run_cli("convert", str(tiny["hf"]), "-o", str(tmp_path / "z.edgelm"), "--imatrix", str(bad), "-q")
    assert_clean_error(r, "not an edgelm importance")
    r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(tmp_path / "no" / "dir" / "im.npz"), "-q")
    assert_clean_error(r, "does not exist")
    r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(tmp_path / "im.npz"), "--tokens", "3", "-q")
    assert_clean_error(r, "--tokens must be at least 16")
    r = run_cli("imatrix", "-m", str(tiny["fp32"]), "-o", str(tmp_path / "im.npz"), "--text", str(tmp_path / "nope.txt"))
    assert_clean_error(r, "no such text file")
    with pytest.raises(BadInputError, match="cannot write"):
        im.save(tmp_path / "missing-dir" / "x.npz", {"a": np.ones(2, np.float32)}, {})
    assert json.loads(json.dumps(im.load(other)[1])) == {"model": "x"}
