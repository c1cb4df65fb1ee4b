"""Gemma 3n: HF import, logits parity with transformers, cache consistency, PLE read on
demand, MatFormer slicing, synthetic geometries, bad input.

Every checkpoint is a tiny random one made locally with transformers
(tests/gemma3n_fixtures.py): 10 layers L L L L G L L L L G, the last 4 KV-shared (6, 7, 8
read layer 5's cache, 9 reads layer 4's), sparsity on layers 0-2, sliding window 8,
AltUp, LAuReL, PLE over a smaller vocabulary than the main one, per-layer FFN widths,
soft-cap 5.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import gemma3n_fixtures as g3n  # noqa: E402
import hf_fixtures as fx  # noqa: E402

from edgelm.convert.common import convert, plan_tensors  # noqa: E402
from edgelm.convert.hf import load_hf_source  # noqa: E402
from edgelm.convert.matformer import parse_spec, slice_source, sliced_config  # noqa: E402
from edgelm.errors import BadInputError, FormatError  # noqa: E402
from edgelm.format.bundle import Bundle  # noqa: E402
from edgelm.models import gemma3n  # noqa: E402
from edgelm.quant.schemes import QTensor  # noqa: E402
from edgelm.runtime.engine import Engine  # noqa: E402

from .conftest import assert_clean_error, run_cli  # noqa: E402

N_PROMPT = 40  # > 4 x sliding_window (8)
BACKENDS = ["numpy", "cpu"]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("g3n")
    cache: dict[str, Path] = {}
    recipes = {
        "plain": lambda d: g3n.make_tiny_gemma3n(d, seed=1),
        "mm": lambda d: g3n.make_tiny_gemma3n_multimodal(d, seed=2),
    }

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = recipes[name](root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def plain_bundle(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("g3nb") / "plain.edgelm"
    convert(load_hf_source(ckpts("plain")), out, scheme="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def reference(ckpts):
    cache = {}

    def get(d: Path):
        if d not in cache:
            cache[d] = g3n.load_reference(d)
        return cache[d]

    return get


def _prompt(vocab: int, n: int = N_PROMPT, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [fx.BOS] + rng.integers(6, vocab, size=n - 1).tolist()


def _ref_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _score(bundle, ids, backend="numpy", **kw) -> np.ndarray:
    kw.setdefault("kv_dtype", "f32")  # parity checks compare the model's math (fp16 KV: its own test)
    eng = Engine(bundle, backend=backend, max_tokens=128, **kw)
    try:
        return eng.score(ids)
    finally:
        eng.close()


def _assert_rows_close(got, ref, rel=1e-3, what=""):
    assert got.shape == ref.shape and got.dtype == np.float32
    for p in range(ref.shape[0]):
        tol = rel * max(1.0, float(np.abs(ref[p]).max()))
        err = float(np.abs(got[p] - ref[p]).max())
        assert err <= tol, f"{what} position {p}: max |edgelm - reference| = {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- import


def test_import_names_values_and_shared_layers(ckpts, plain_bundle):
    d = ckpts("plain")
    src = load_hf_source(d)
    assert src.arch == "gemma3n" and src.notes == []
    cfg = gemma3n.Config.from_dict(src.config)
    assert cfg.num_kv_shared_layers == g3n.KV_SHARED and cfg.first_kv_shared_layer == 6
    assert cfg.kv_source() == (0, 1, 2, 3, 4, 5, 5, 5, 5, 4)  # transformers' "store" layers 5 (local), 4 (global)
    assert cfg.intermediate_size[:2] == (128, 96) and cfg.activation_sparsity[:4] == (0.95, 0.9, 0.8, 0.0)
    kinds = {st.name: st.kind for st in src.tensors}
    assert kinds["per_layer_token_embd.weight"] == "ple" and kinds["token_embd.weight"] == "embed"
    assert "blk.5.attn_k.weight" in kinds and "blk.6.attn_k.weight" not in kinds and "blk.9.attn_v.weight" not in kinds
    sd = fx.raw_state_dict(d)
    with Bundle(plain_bundle) as b:
        def arr(name):
            return np.asarray(b.tensor(name).dequantize())
        # Gemma 3n norms are stored as-is (RMSNorm multiplies by w, no 1 + w)
        np.testing.assert_array_equal(arr("blk.3.attn_norm.weight"), sd["model.layers.3.input_layernorm.weight"].numpy())
        np.testing.assert_array_equal(arr("blk.3.altup_correct_scale.weight"),
                                      sd["model.layers.3.altup.correct_output_scale"].numpy())
        np.testing.assert_array_equal(arr("altup_unembd_proj.weight"), torch.cat(
            [sd[f"model.altup_unembed_projections.{j}.weight"] for j in range(3)]).numpy())
        np.testing.assert_array_equal(arr("per_layer_token_embd.weight"), sd["model.embed_tokens_per_layer.weight"].numpy())
        np.testing.assert_array_equal(arr("blk.9.inp_gate.weight"), sd["model.layers.9.per_layer_input_gate.weight"].numpy())
        assert b.tensor("blk.1.ffn_down.weight").shape == (64, 96)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_parity_with_transformers(ckpts, plain_bundle, reference, backend):
    ref_model = reference(ckpts("plain"))
    cfg = ref_model.config
    ids = _prompt(cfg.vocab_size)
    assert len(ids) > 4 * cfg.sliding_window and cfg.num_kv_shared_layers > 0
    assert max(ids) >= cfg.vocab_size_per_layer_input  # some ids take PLE row 0
    ref = _ref_logits(ref_model, ids)
    got = _score(plain_bundle, ids, backend)
    _assert_rows_close(got, ref, what=backend)
    if backend == "cpu":  # the default fp16 KV cache (shared layers read it too): K/V rounded to fp16
        got16 = _score(plain_bundle, ids, backend, kv_dtype="f16")
        assert not np.array_equal(got16, got)  # the cache really is fp16
        # the kernels agree with the numpy reference given the same fp16 cache ...
        _assert_rows_close(got16, _score(plain_bundle, ids, "numpy", kv_dtype="f16"), what="cpu vs numpy, fp16 KV")
        # ... and the rounding moves this random model's logits by < 2% of their range
        _assert_rows_close(got16, ref, rel=2e-2, what="cpu, fp16 KV")


def test_cli_convert_multimodal_checkpoint_parity(ckpts, reference, tmp_path):
    """Gemma3nForConditionalGeneration layout through `edgelm convert --no-vision --no-audio`
    (the fixture's stand-in tower tensors are skipped)."""
    d = ckpts("mm")
    out = tmp_path / "mm.edgelm"
    proc = run_cli("convert", d, "-o", out, "--scheme", "fp32", "--no-vision", "--no-audio")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 5 vision/audio tower" in proc.stdout
    ref_model = reference(d.parent / (d.name + "-text"))  # same text weights, CausalLM layout
    ids = _prompt(ref_model.config.vocab_size, seed=3)
    _assert_rows_close(_score(out, ids), _ref_logits(ref_model, ids), what="cli")
    with Bundle(out) as b:
        assert b.arch == "gemma3n" and not any("vision" in n or "audio" in n for n in b.tensor_names())


@pytest.mark.parametrize("k", [1, 7, 23])
@pytest.mark.parametrize("prefill_chunk", [256, 5])
def test_cache_consistency(plain_bundle, k, prefill_chunk):
    eng = Engine(plain_bundle, backend="numpy", max_tokens=64, prefill_chunk=prefill_chunk)
    try:
        ids = _prompt(eng.config.vocab_size, seed=k)
        full = eng.score(ids)
        s = eng.create_session()
        rows = [s.prefill(ids[:k], return_logits=True)]
        for tok in ids[k:]:
            rows.append(s.decode_step(tok)[None, :])
        last = eng.create_session().prefill(ids)  # "last"/"none" chunks skip the shared layers
    finally:
        eng.close()
    inc = np.concatenate(rows, axis=0)
    assert inc.shape == full.shape
    tol = 1e-4 * max(1.0, float(np.abs(full).max()))
    assert float(np.abs(inc - full).max()) <= tol
    assert float(np.abs(last - full[-1]).max()) <= tol


# ----------------------------------------------------------------------------- PLE on demand


class _CountingTable(QTensor):
    """A PLE table that records every row gathered and refuses whole-table reads."""

    requested: list

    def dequantize(self):
        raise AssertionError("the whole PLE table was dequantized")

    def dequantize_rows(self, ids):
        self.requested.extend(np.asarray(ids).reshape(-1).tolist())
        return super().dequantize_rows(ids)


@pytest.mark.parametrize("ple_scheme", ["fp32", "int4-b32"])
def test_ple_is_read_on_demand(ckpts, tmp_path, ple_scheme):
    out = tmp_path / f"ple-{ple_scheme}.edgelm"
    convert(load_hf_source(ckpts("plain")), out, scheme="int8", embed_scheme="int8", ple_scheme=ple_scheme,
            progress=False)
    with Bundle(out) as b:
        schemes = {n: b.tensor_info(n)["scheme"] for n in b.tensor_names()}
        assert b.meta["quantization"]["ple_scheme"] == ple_scheme
    assert schemes["per_layer_token_embd.weight"] == ple_scheme and schemes["token_embd.weight"] == "int8"
    eng = Engine(out, backend="numpy", max_tokens=64)
    try:
        t = eng.weights.ple
        assert isinstance(t, QTensor) and not any(p.flags.owndata for p in t.parts.values())  # mmap views
        counting = _CountingTable(t.scheme, t.shape, t.parts)
        counting.requested = []
        object.__setattr__(eng, "weights", dataclasses.replace(eng.weights, ple=counting))  # test-only probe
        ids = _prompt(eng.config.vocab_size, n=20, seed=5)
        logits = eng.score(ids)
        s = eng.create_session()
        s.prefill(ids[:10])
        s.decode_step(ids[10])
    finally:
        eng.close()
    assert np.isfinite(logits).all()
    vp = eng.config.vocab_size_per_layer_input
    want = [i if i < vp else 0 for i in ids] + [i if i < vp else 0 for i in ids[:11]]
    assert sorted(counting.requested) == sorted(want)  # exactly the rows of the tokens fed
    assert len(set(counting.requested)) < t.rows
    deq_ids = set(eng.ops._deq)  # the reference backend's dequantized-weight cache
    assert not deq_ids & {id(p) for p in t.parts.values()}


def test_quantized_gemma3n_backends_agree(ckpts, tmp_path):
    """int8 / int4 bundles: the native kernels equal the numpy reference. (Quantized logits
    are not compared with fp32 here: this random tiny AltUp model amplifies any rounding,
    fp16 included, far more than trained weights do.)"""
    out = tmp_path / "q.edgelm"
    convert(load_hf_source(ckpts("plain")), out, scheme="int8", embed_scheme="int4-b32", ple_scheme="int4-b32",
            progress=False)
    ids = _prompt(320, seed=9)
    from edgelm.backends import native

    # Exact fp32-activation path: the int8-activation (qd8) path is checked against the
    # reference by tests/test_kernels.py, and on real weights by tests/test_real_model.py.
    prev = native.get_qd8()
    native.set_qd8(0)
    try:
        _assert_rows_close(_score(out, ids, backend="cpu"), _score(out, ids, backend="numpy"), what="int8 cpu vs numpy")
    finally:
        native.set_qd8(None if prev < 0 else prev)


def test_sparsity_multiplier_matches_torch():
    for s in (0.95, 0.9, 0.8, 0.5):
        want = float(torch.distributions.normal.Normal(0, 1).icdf(torch.tensor(s, dtype=torch.float64)))
        assert math.isclose(gemma3n.sparsity_multiplier(s), want, rel_tol=1e-9, abs_tol=1e-12)


# ----------------------------------------------------------------------------- MatFormer


def _hf_slice(src_dir: Path, keep, widths):
    """The transformers model of a MatFormer slice, made by slicing the HF weights directly."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    base = json.loads((src_dir / "config.json").read_text())
    first = base["num_hidden_layers"] - base["num_kv_shared_layers"]
    P = base["hidden_size_per_layer_input"]
    kw = g3n.text_config_kwargs(
        layers=len(keep), intermediate_size=list(widths),
        activation_sparsity_pattern=[base["activation_sparsity_pattern"][i] for i in keep],
        num_kv_shared_layers=sum(1 for i in keep if i >= first),
    )
    kw["layer_types"] = [base["layer_types"][i] for i in keep]
    model = Gemma3nForCausalLM(Gemma3nTextConfig(**kw)).eval()
    sd = fx.raw_state_dict(src_dir)
    new = {}
    cols = torch.cat([torch.arange(i * P, (i + 1) * P) for i in keep])
    for k, v in sd.items():
        if ".layers." not in k:
            if k == "model.embed_tokens_per_layer.weight":
                v = v[:, cols]
            elif k == "model.per_layer_model_projection.weight":
                v = v[cols]
            new[k] = v
    for j, i in enumerate(keep):
        pre = f"model.layers.{i}."
        for k, v in sd.items():
            if not k.startswith(pre):
                continue
            tail = k[len(pre):]
            if tail in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                v = v[: widths[j]]
            elif tail == "mlp.down_proj.weight":
                v = v[:, : widths[j]]
            new[f"model.layers.{j}.{tail}"] = v
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied
    model.load_state_dict(new, strict=True)
    return model


def test_matformer_slice_matches_sliced_transformers(ckpts, tmp_path):
    d = ckpts("plain")
    spec = "0,2-5,7,9:64x3,128,96,32,96"  # drop a computing layer (1) and a shared one (8); shrink FFNs
    src = slice_source(load_hf_source(d), spec)
    cfg = gemma3n.Config.from_dict(src.config)
    keep = (0, 2, 3, 4, 5, 7, 9)
    assert cfg.num_layers == 7 and cfg.num_kv_shared_layers == 2 and cfg.intermediate_size == (64, 64, 64, 128, 96, 32, 96)
    assert cfg.kv_source() == (0, 1, 2, 3, 4, 4, 3)  # old 7 -> old 5 (new 4), old 9 -> old 4 (new 3)
    assert cfg.activation_sparsity == (0.95, 0.8, 0, 0, 0, 0, 0)
    out = tmp_path / "slice.edgelm"
    convert(src, out, scheme="fp32", progress=False)
    with Bundle(out) as b:
        assert b.tensor("per_layer_token_embd.weight").shape == (300, 7 * 16)
        assert b.tensor("blk.5.ffn_down.weight").shape == (64, 32)
        assert "blk.5.attn_k.weight" not in b and b.meta["source"]["matformer"]["kept_layers"] == list(keep)
    ref_model = _hf_slice(d, keep, cfg.intermediate_size)
    ids = _prompt(320, seed=4)
    _assert_rows_close(_score(out, ids), _ref_logits(ref_model, ids), what="matformer")


def test_matformer_e2b_geometry():
    """The E2B preset on an E4B config gives the published E2B text geometry."""
    from edgelm.convert.synthetic import synthetic_config

    _, e4b = synthetic_config("gemma3n-e4b")
    _, e2b = synthetic_config("gemma3n-e2b")
    sl = parse_spec("e2b", e4b)
    assert sl.keep == tuple(range(20)) + tuple(range(25, 35))
    assert sliced_config(e4b, sl, "e2b") == gemma3n.Config.from_dict(e2b).to_dict()


@pytest.mark.parametrize("spec, needle", [
    ("e3b", "LAYERS:FFN_WIDTHS"),
    ("e2b", "35-layer"),
    ("0-12:64", "does not exist"),
    ("all:256", "must be in 1..128"),
    ("all:64,64", "2 FFN widths for 10 kept layers"),
    ("0-5,9:x", "not a width"),
    ("all:2_048*4", "must be in 1..128"),  # Google's table writes widths as products
    ("0-3,6-9:64", "holds the KV cache"),  # shared layers whose producers (4, 5) are dropped
    ("5-1:64", "backwards"),
    ("", "needs a spec"),
])
def test_matformer_bad_specs(ckpts, spec, needle):
    src = load_hf_source(ckpts("plain"))
    with pytest.raises(BadInputError) as ei:
        slice_source(src, spec)
    msg = str(ei.value)
    assert "\n" not in msg and needle in msg, msg


def test_matformer_edge_specs(ckpts):
    src = load_hf_source(ckpts("plain"))
    assert slice_source(src, "0-5,4-9:full").config == src.config  # overlapping ranges: a set; full widths
    assert slice_source(src, "0-3:64").config["num_kv_shared_layers"] == 0  # no shared layer kept
    with pytest.raises(BadInputError, match="applies to Gemma 3n"):
        slice_source(dataclasses.replace(src, arch="gemma3"), "e2b")


def test_cli_bad_matformer_and_missing_config(ckpts, tmp_path):
    proc = run_cli("convert", ckpts("plain"), "-o", tmp_path / "x.edgelm", "--matformer", "0-99:8")
    assert_clean_error(proc, "--matformer", "does not exist")
    bad = tmp_path / "noconfig"
    shutil.copytree(ckpts("plain"), bad)
    (bad / "config.json").unlink()
    proc = run_cli("convert", bad, "-o", tmp_path / "y.edgelm")
    assert_clean_error(proc, "no config.json")
    assert not (tmp_path / "x.edgelm").exists() and not (tmp_path / "y.edgelm").exists()


def test_bad_gemma3n_configs(ckpts, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(ckpts("plain"), d)
    p = d / "config.json"
    base = json.loads(p.read_text())
    cases = [
        ({"num_kv_shared_layers": 9}, "do not cover every layer type"),  # layers 0 only: no global producer
        ({"intermediate_size": [128] * 3}, "intermediate_size"),
        ({"activation_sparsity_pattern": [0.5]}, "activation_sparsity_pattern"),
        ({"architectures": ["Gemma3ForCausalLM"]}, "does not match model_type"),
        ({"hidden_activation": "relu"}, "hidden_activation"),
    ]
    for change, needle in cases:
        p.write_text(json.dumps({**base, **change}))
        with pytest.raises(FormatError) as ei:
            load_hf_source(d)
        assert "\n" not in str(ei.value) and needle in str(ei.value), (change, str(ei.value))
    # real checkpoints keep K/V weights in shared layers: ignored with a note
    from safetensors.torch import save_file

    p.write_text(json.dumps(base))
    save_file({"model.layers.7.self_attn.k_proj.weight": torch.zeros(32, 64)}, str(d / "extra.safetensors"))
    src = load_hf_source(d)
    assert any("KV-shared" in n for n in src.notes)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_geometries_plan_without_generating():
    from edgelm.convert.common import summarize
    from edgelm.convert.synthetic import NAMES, synthetic_source
    from edgelm.tokenizer import Tokenizer

    for name in NAMES:
        src = synthetic_source(name)
        shapes = {st.name: st.shape for st in src.tensors}
        plans = plan_tensors(src, "int4-b32", "int8", "int4-b32")
        assert sum(r[3] for r in summarize(plans)) > 0
        if name.startswith("gemma3n"):
            n = src.config["num_layers"]
            assert shapes["per_layer_token_embd.weight"] == (262_144, n * 256)
            assert shapes["token_embd.weight"] == (262_400, 2048)
        else:
            assert shapes["token_embd.weight"][0] in (262_144, 262_208)
    tok = Tokenizer.from_blob(src.tokenizer_kind, src.tokenizer_data, src.special_tokens)
    assert tok.decode(tok.encode("héllo, wörld 日本")) == "héllo, wörld 日本"
    # a quantized passthrough makes parts directly, with the planned layout
    from edgelm.quant.schemes import SCHEMES

    st = next(s for s in src.tensors if s.name == "blk.0.ffn_gate.weight")
    parts = st.passthrough[1](SCHEMES["int4-b32"])
    assert st.passthrough[0] == "*" and parts["q"].shape == (st.shape[0], st.shape[1] // 2)


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    target = str(Path(path).resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = len(head) >= 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_synthetic_gemma3n_runs_without_paging_in_the_ple(tmp_path, monkeypatch):
    """A shrunken E2B-like synthetic geometry (PLE 65536 x 320 fp32 = 80 MiB) converts with
    int4 passthrough and generates; the PLE pages never become resident."""
    from edgelm.convert import synthetic

    _, cfg = synthetic.synthetic_config("gemma3n-e2b")
    small = dict(cfg, vocab_size=512, vocab_size_per_layer_input=65536, hidden_size=64, num_layers=10,
                 intermediate_size=[128] * 10, num_heads=2, num_kv_heads=1, head_dim=32, layer_types=cfg["layer_types"][:10],
                 hidden_size_per_layer_input=32, laurel_rank=32, num_kv_shared_layers=5, sliding_window=16,
                 activation_sparsity=[0.95] * 2 + [0.0] * 8)
    monkeypatch.setitem(synthetic.GEOMETRIES, "tiny-3n", ("gemma3n", small))
    src = synthetic.synthetic_source("tiny-3n")
    out = tmp_path / "syn.edgelm"
    convert(src, out, scheme="int4-b32", ple_scheme="fp32", progress=False)
    eng = Engine(out, backend="cpu", max_tokens=64)
    try:
        assert eng.weights.ple.nbytes == 65536 * 320 * 4
        s = eng.create_session({"temperature": 0.0})
        pieces = list(s.generate("the model", max_new_tokens=4))
        assert pieces[-1].generated_tokens == 4
        resident = _mapped_rss(out)
        assert 0 < resident < 16 << 20, f"{resident / 2**20:.1f} MiB of the bundle is resident"
    finally:
        eng.close()
