"""Hugging Face Gemma 3 import: names, 1+w folding, bf16, configs, bad input, logits parity.

Every checkpoint is a tiny random one made locally with transformers (tests/hf_fixtures.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402

from edgelm.convert.common import convert  # noqa: E402
from edgelm.convert.hf import canonical_name, load_hf_source, text_config_from_hf  # noqa: E402
from edgelm.errors import FormatError  # noqa: E402
from edgelm.format.bundle import Bundle  # noqa: E402
from edgelm.models.gemma3 import Gemma3Config  # noqa: E402
from edgelm.quant.schemes import dequantize  # noqa: E402

# ----------------------------------------------------------------------------- tokenizer stand-in
# edgelm.tokenizer.build is written in parallel; until it exists, the importer's call to
# tokenizer_from_hf_dir goes to this stand-in (only when the module itself is absent).

STUB_SPECIAL = {"bos": fx.BOS, "eos": fx.EOS, "unk": fx.UNK, "pad": fx.PAD, "start_of_turn": fx.SOT,
                "end_of_turn": fx.EOT, "stop": [fx.EOS, fx.EOT], "add_bos": True}


def _stub_tokenizer_from_hf_dir(path):
    p = Path(path) / "tokenizer.json"
    if not p.is_file():
        raise FormatError(f"{path}: no tokenizer.json")
    return "hf-json-stub", p.read_bytes(), dict(STUB_SPECIAL)


@pytest.fixture(autouse=True)
def _tokenizer_module(monkeypatch):
    try:
        import edgelm.tokenizer.build  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "edgelm.tokenizer.build":
            raise
        stub = types.ModuleType("edgelm.tokenizer.build")
        stub.tokenizer_from_hf_dir = _stub_tokenizer_from_hf_dir
        monkeypatch.setitem(sys.modules, "edgelm.tokenizer.build", stub)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """Lazily built, shared tiny checkpoints (never modified by tests: they copy first)."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Path] = {}
    recipes = {
        "plain": lambda d: fx.make_tiny_gemma3(d, seed=1),
        "bf16": lambda d: fx.make_tiny_gemma3(d, seed=2, dtype="bfloat16"),
        "f16": lambda d: fx.make_tiny_gemma3(d, seed=3, dtype="float16"),
        "linear": lambda d: fx.make_tiny_gemma3(d, seed=4, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        "softcap": lambda d: fx.make_tiny_gemma3(d, seed=5, final_logit_softcapping=2.0),
        "attn_softcap": lambda d: fx.make_tiny_gemma3(d, seed=6, attn_logit_softcapping=1.5),
        "sharded": lambda d: fx.make_tiny_gemma3(d, seed=7, max_shard_size="100KB"),
        "mm": lambda d: fx.make_tiny_gemma3_multimodal(d, seed=8),
    }

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = recipes[name](root / name)
        return cache[name]

    return get


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def dir_digest(d: Path) -> dict:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.iterdir())}


def hf_text_params(sd: dict) -> dict[str, torch.Tensor]:
    """Canonical name -> stored tensor, for the text decoder's tensors of a raw state dict."""
    out = {}
    for k, v in sd.items():
        cls, canon = canonical_name(k)
        if cls == "text":
            out[canon] = v
    return out


def bundle_array(b: Bundle, name: str) -> np.ndarray:
    qt = b.tensor(name)
    if len(qt.shape) == 1:
        return np.asarray(qt.parts["w"])
    return dequantize(qt)


def check_bundle_against(bundle_path: Path, ckpt: Path) -> None:
    """Every bundle tensor equals the checkpoint's (widened to fp32; norms as 1 + w)."""
    sd = fx.raw_state_dict(ckpt)
    want = hf_text_params(sd)
    with Bundle(bundle_path) as b:
        assert set(b.tensor_names()) == set(want)
        for name, t in want.items():
            got = bundle_array(b, name)
            ref = t.float()
            if name.endswith("norm.weight"):
                ref = 1.0 + ref
                assert not np.all(got == 1.0), f"{name}: fixture norms should be random"
            ref = ref.numpy()
            assert got.dtype == np.float32 and got.shape == ref.shape, name
            np.testing.assert_array_equal(got, ref, err_msg=name)


def to_bundle(src_dir: Path, out: Path, scheme: str = "fp32") -> Path:
    convert(load_hf_source(src_dir), out, scheme=scheme, progress=False)
    return out


# ----------------------------------------------------------------------------- imports


def test_fp32_import_matches_state_dict(ckpts, tmp_path):
    d = ckpts("plain")
    before = dir_digest(d)
    src = load_hf_source(d)
    assert src.arch == "gemma3"
    assert src.description["format"] == "hf" and src.description["path"] == str(d)
    assert src.description["dtype"] == "F32"
    assert src.notes == []
    assert src.chat_template == fx.CHAT_TEMPLATE
    assert src.add_bos is True
    sp = src.special_tokens
    assert (sp["bos"], sp["eos"], sp["pad"], sp["unk"]) == (fx.BOS, fx.EOS, fx.PAD, fx.UNK)
    assert (sp["start_of_turn"], sp["end_of_turn"]) == (fx.SOT, fx.EOT)
    assert src.tokenizer_data
    kinds = {t.name: t.kind for t in src.tensors}
    assert kinds["token_embd.weight"] == "embed"
    assert kinds["blk.0.attn_q.weight"] == "linear" and kinds["blk.3.ffn_down.weight"] == "linear"
    assert kinds["blk.0.attn_q_norm.weight"] == "norm" and kinds["output_norm.weight"] == "norm"
    t = next(t for t in src.tensors if t.name == "blk.2.attn_k.weight")
    arr = t.load()
    assert arr.dtype == np.float32 and arr.shape == t.shape == (2 * 32, 64) and arr.flags.c_contiguous

    out = tmp_path / "plain.edgelm"
    summary = convert(src, out, scheme="fp32", progress=False)
    assert summary["tensors"] == 2 + 13 * 7
    check_bundle_against(out, d)
    with Bundle(out) as b:
        cfg = Gemma3Config.from_dict(b.config)
        assert b.header["source"]["format"] == "hf"
        assert b.blob("tokenizer") == src.tokenizer_data
        assert b.header["chat_template"] == fx.CHAT_TEMPLATE
    assert cfg.layer_types == ("local", "local", "global", "local", "local", "global", "local")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (288, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (7, 4, 2, 32)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_factor) == (40_000.0, 10_000.0, 1.0)
    assert cfg.sliding_window == 16 and cfg.query_pre_attn_scalar == 32.0
    assert cfg.final_logit_softcap is None and cfg.attn_logit_softcap is None
    assert cfg.max_position_embeddings == 1024 and cfg.rms_norm_eps == 1e-6
    assert dir_digest(d) == before, "the source directory was modified"


@pytest.mark.parametrize("which,dtype", [("bf16", "BF16"), ("f16", "F16")])
def test_half_precision_import_widens_exactly(ckpts, tmp_path, which, dtype):
    d = ckpts(which)
    sd = fx.raw_state_dict(d)
    assert {str(v.dtype) for v in sd.values()} == {f"torch.{'bfloat16' if which == 'bf16' else 'float16'}"}
    src = load_hf_source(d)
    assert src.description["dtype"] == dtype
    assert {t.source_type for t in src.tensors} == {dtype}
    out = to_bundle(d, tmp_path / f"{which}.edgelm")
    check_bundle_against(out, d)  # compares against torch's own widening (t.float())


def test_bf16_special_values_widen_like_torch(tmp_path):
    from safetensors.torch import save_file

    from edgelm.convert.hf import read_safetensors_header

    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-40, 3.0e38, float("inf"), float("-inf"), float("nan")],
                     dtype=torch.bfloat16)
    f = tmp_path / "x.safetensors"
    save_file({"x": x}, str(f))
    got = read_safetensors_header(f)["x"].read()
    np.testing.assert_array_equal(got.view(np.uint32), x.float().numpy().view(np.uint32))


def test_sharded_checkpoint_with_index(ckpts, tmp_path):
    d = ckpts("sharded")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("*.safetensors"))) > 2
    src = load_hf_source(d)
    assert len(src.description["files"]) > 2
    check_bundle_against(to_bundle(d, tmp_path / "sharded.edgelm"), d)


def test_quantized_conversion_of_hf_source(ckpts, tmp_path):
    d = ckpts("plain")
    out = to_bundle(d, tmp_path / "q4.edgelm", scheme="int4-b32")
    with Bundle(out) as b:
        assert b.tensor_info("blk.0.attn_q.weight")["scheme"] == "int4-b32"
        assert b.tensor_info("blk.0.attn_norm.weight")["scheme"] == "fp32"
        want = hf_text_params(fx.raw_state_dict(d))
        np.testing.assert_array_equal(bundle_array(b, "output_norm.weight"), (1.0 + want["output_norm.weight"]).numpy())


# ----------------------------------------------------------------------------- naming conventions


def rename_checkpoint(src: Path, dst: Path, fn) -> Path:
    """Copy a single-file checkpoint, renaming (or dropping, when fn returns None) tensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    new = {}
    for k, v in sd.items():
        nk = fn(k, v)
        if nk is None:
            continue
        if isinstance(nk, dict):
            new.update(nk)
        else:
            new[nk] = v
    save_file(new, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("prefix", ["model.", "model.language_model.", "language_model.model.", "language_model.", ""])
def test_text_weight_prefixes(ckpts, tmp_path, prefix):
    base = ckpts("plain")
    d = rename_checkpoint(base, tmp_path / "ck", lambda k, v: prefix + k[len("model."):])
    check_bundle_against(to_bundle(d, tmp_path / "b.edgelm"), base)


def test_multimodal_skips_vision(ckpts, tmp_path):
    d = ckpts("mm")
    raw = json.loads((d / "config.json").read_text())
    assert raw["model_type"] == "gemma3"
    sd = fx.raw_state_dict(d)
    # transformers 5 writes the legacy layout to disk
    assert any(k.startswith("language_model.model.layers.") for k in sd)
    assert any(k.startswith("vision_tower.") for k in sd)
    assert any(k.startswith("multi_modal_projector.") for k in sd)
    src = load_hf_source(d)
    assert any("vision" in n and "skipped" in n for n in src.notes), src.notes
    n_vision = sum(1 for k in sd if canonical_name(k)[0] == "vision")
    assert any(str(n_vision) in n for n in src.notes)
    cfg = Gemma3Config.from_dict(src.config)
    assert cfg.num_layers == 3 and cfg.hidden_size == 64
    assert cfg.layer_types == ("local", "local", "global")
    check_bundle_against(to_bundle(d, tmp_path / "mm.edgelm"), d)


def test_multimodal_new_style_names(ckpts, tmp_path):
    """transformers >= 4.52 in-memory names: model.language_model.*, model.vision_tower.*."""
    base = ckpts("mm")

    def fn(k, v):
        for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                return new + k[len(old):]
        return k

    d = rename_checkpoint(base, tmp_path / "ck", fn)
    src = load_hf_source(d)
    assert any("skipped" in n for n in src.notes)
    check_bundle_against(to_bundle(d, tmp_path / "b.edgelm"), base)


def test_lm_head_tied_copy_is_ignored(ckpts, tmp_path):
    base = ckpts("plain")

    def add_head(k, v):
        return {k: v, "lm_head.weight": v.clone()} if k == "model.embed_tokens.weight" else k

    d = rename_checkpoint(base, tmp_path / "ck", add_head)
    src = load_hf_source(d)
    assert src.notes == []
    assert "lm_head.weight" not in {t.name for t in src.tensors}
    check_bundle_against(to_bundle(d, tmp_path / "b.edgelm"), base)


def test_lm_head_that_differs_is_noted(ckpts, tmp_path):
    base = ckpts("plain")

    def add_head(k, v):
        return {k: v, "lm_head.weight": v * 2} if k == "model.embed_tokens.weight" else k

    d = rename_checkpoint(base, tmp_path / "ck", add_head)
    src = load_hf_source(d)
    assert any("lm_head.weight" in n and "ignored" in n for n in src.notes), src.notes


# ----------------------------------------------------------------------------- configs


BASE_TEXT = {
    "model_type": "gemma3_text",
    "architectures": ["Gemma3ForCausalLM"],
    "vocab_size": 288, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "sliding_window": 16,
    "max_position_embeddings": 1024, "query_pre_attn_scalar": 32, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None, "attn_logit_softcapping": None,
}


def _with(**kw):
    d = copy.deepcopy(BASE_TEXT)
    for k, v in kw.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_DROP = object()

CONFIG_CASES = {
    # transformers 4 (<= 4.5x): rope_theta / rope_local_base_freq / rope_scaling, pattern int
    "v4_pattern": (_with(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
                         sliding_window_pattern=4),
                   dict(rope_theta=1e6, rope_local_theta=1e4, rope_scaling_factor=8.0,
                        layer_types=("local",) * 3 + ("global",) + ("local",) * 3 + ("global",))),
    "v4_no_scaling_default_pattern": (_with(rope_theta=5e5, rope_local_base_freq=2e4, rope_scaling=None),
                                      dict(rope_theta=5e5, rope_local_theta=2e4, rope_scaling_factor=1.0,
                                           layer_types=("local",) * 5 + ("global",) + ("local",) * 2)),
    "v4_layer_types": (_with(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None, sliding_window_pattern=6,
                             layer_types=["full_attention", "sliding_attention"] * 4),
                       dict(rope_scaling_factor=1.0, layer_types=("global", "local") * 4)),
    "v4_defaults": (_with(), dict(rope_theta=1e6, rope_local_theta=1e4, rope_scaling_factor=1.0)),
    # transformers 5: rope_parameters keyed by layer type; the stale _sliding_window_pattern it
    # also writes must lose to layer_types
    "v5": (_with(_sliding_window_pattern=6, layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 4,
                 rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
           dict(rope_theta=1e6, rope_local_theta=1e4, rope_scaling_factor=4.0,
                layer_types=("local",) * 3 + ("global",) + ("local",) * 4)),
    "v5_default_rope": (_with(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 3e5},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 5e3}},
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
                        dict(rope_theta=3e5, rope_local_theta=5e3, rope_scaling_factor=1.0,
                             final_logit_softcap=30.0, attn_logit_softcap=None)),
}


def _transformers_view(cfg: dict) -> dict:
    """The same fields as transformers itself derives them from the config dict."""
    from transformers import Gemma3Config as HFMulti
    from transformers import Gemma3TextConfig

    c = HFMulti.from_dict(copy.deepcopy(cfg)).text_config if cfg["model_type"] == "gemma3" else \
        Gemma3TextConfig.from_dict(copy.deepcopy(cfg))
    rp = c.rope_parameters
    lt = {"sliding_attention": "local", "full_attention": "global"}
    full = rp["full_attention"]
    return dict(
        rope_theta=float(full["rope_theta"]),
        rope_local_theta=float(rp["sliding_attention"]["rope_theta"]),
        rope_scaling_factor=float(full.get("factor", 1.0)) if full["rope_type"] == "linear" else 1.0,
        layer_types=tuple(lt[t] for t in c.layer_types),
        sliding_window=c.sliding_window, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim, intermediate_size=c.intermediate_size, query_pre_attn_scalar=float(c.query_pre_attn_scalar),
        # transformers keeps attn_logit_softcapping in the config but Gemma3Attention never applies it
        final_logit_softcap=c.final_logit_softcapping, attn_logit_softcap=None,
        max_position_embeddings=c.max_position_embeddings,
    )


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_variants_match_transformers(case):
    raw, expect = CONFIG_CASES[case]
    ours, _, _ = text_config_from_hf(copy.deepcopy(raw))
    cfg = Gemma3Config.from_dict(ours)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    for k, v in _transformers_view(raw).items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)


def test_attn_logit_softcapping_is_dropped_with_a_note():
    raw = _with(attn_logit_softcapping=50.0)
    ours, _, notes = text_config_from_hf(raw)
    assert ours["attn_logit_softcap"] is None
    assert any("attn_logit_softcapping" in n for n in notes)


def test_legacy_rope_scaling_type_key():
    """rope_scaling {"type": "linear"} (pre-"rope_type" spelling) still means linear scaling.

    transformers 5 drops it for Gemma 3 (its rope_type stays "default"); transformers 4 and
    the original intent honour it, so edgelm does."""
    raw = _with(rope_scaling={"type": "linear", "factor": 8.0})
    cfg = Gemma3Config.from_dict(text_config_from_hf(raw)[0])
    assert cfg.rope_scaling_factor == 8.0


def test_sparse_multimodal_text_config_uses_transformers_defaults():
    """gemma-3-4b-it's config.json lists only the text fields that differ from the defaults."""
    raw = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    ours, _, notes = text_config_from_hf(copy.deepcopy(raw))
    cfg = Gemma3Config.from_dict(ours)
    assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (262_208, 8, 4, 256)
    assert cfg.rope_scaling_factor == 8.0 and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert cfg.layer_types[:6] == ("local",) * 5 + ("global",)
    assert any("defaults" in n for n in notes)
    for k, v in _transformers_view(raw).items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)


@pytest.mark.parametrize("name", ["plain", "linear", "softcap"])
def test_saved_configs_round_trip(ckpts, name):
    d = ckpts(name)
    raw = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in raw  # what transformers 5 writes
    cfg = Gemma3Config.from_dict(load_hf_source(d).config)
    assert Gemma3Config.from_dict(cfg.to_dict()) == cfg
    for k, v in _transformers_view(raw).items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    if name == "linear":
        assert cfg.rope_scaling_factor == 4.0
    if name == "softcap":
        assert cfg.final_logit_softcap == 2.0


# ----------------------------------------------------------------------------- bad input


def _edit_config(d: Path, fn) -> None:
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _raises(d, *needles):
    with pytest.raises(FormatError) as ei:
        load_hf_source(d)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_missing_directory(tmp_path):
    _raises(tmp_path / "nope", str(tmp_path / "nope"), "no such directory")


def test_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    _raises(f, str(f), "not a directory")


def test_no_config(tmp_path):
    msg = _raises(tmp_path, str(tmp_path), "no config.json")
    assert msg == f"{tmp_path}: no config.json — not a Hugging Face checkpoint directory"


def test_config_not_json(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    (d / "config.json").write_text("{not json")
    _raises(d, "config.json", "not valid JSON")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3n"])
def test_unsupported_model_type(ckpts, tmp_path, model_type):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(model_type=model_type))
    _raises(d, "config.json", "model_type", model_type)


def test_unsupported_architecture(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(architectures=["Gemma3ForSequenceClassification"]))
    _raises(d, "config.json", "Gemma3ForSequenceClassification")


@pytest.mark.parametrize("style", ["v5", "v4"])
def test_unsupported_rope_type(ckpts, tmp_path, style):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    if style == "v5":
        def fn(c):
            c["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}
        _edit_config(d, fn)
        _raises(d, "config.json", "rope_parameters.full_attention.rope_type", "yarn")
    else:
        def fn(c):
            del c["rope_parameters"]
            c["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
        _edit_config(d, fn)
        _raises(d, "config.json", "rope_scaling.rope_type", "dynamic")


def test_linear_scaling_on_sliding_layers_rejected(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="linear", factor=2.0))
    _raises(d, "rope_parameters.sliding_attention")


def test_wrong_activation(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(hidden_activation="silu"))
    _raises(d, "config.json", "hidden_activation", "silu")


@pytest.mark.parametrize("field,value", [("tie_word_embeddings", False), ("use_bidirectional_attention", True),
                                         ("attention_bias", True), ("num_key_value_heads", 3),
                                         ("hidden_size", "64"), ("sliding_window", None)])
def test_bad_config_fields(ckpts, tmp_path, field, value):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update({field: value}))
    msg = _raises(d, "config.json")
    assert field in msg or (field == "num_key_value_heads" and "kv heads" in msg), msg


def test_bad_layer_types(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(layer_types=["sliding_attention"] * 3))
    _raises(d, "config.json", "layer_types", "3 entries")


def test_no_safetensors(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    (d / "model.safetensors").unlink()
    _raises(d, str(d), "no *.safetensors")


def test_missing_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts("sharded"), tmp_path / "ck")
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    _raises(d, "model.safetensors.index.json", victim.name, "missing")


def test_missing_tensor(ckpts, tmp_path):
    d = rename_checkpoint(ckpts("plain"), tmp_path / "ck",
                          lambda k, v: None if k == "model.layers.3.self_attn.k_norm.weight" else k)
    _raises(d, "missing tensor", "blk.3.attn_k_norm.weight", "layers.3.self_attn.k_norm.weight")


def test_shape_mismatch(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(intermediate_size=256))
    msg = _raises(d, "model.safetensors", "model.layers.0.mlp.", "has shape", "config.json implies")
    assert "256" in msg and "128" in msg


def test_vocab_mismatch(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: c.update(vocab_size=1000))
    _raises(d, "model.embed_tokens.weight", "shape")


def test_extra_layer_tensor(ckpts, tmp_path):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    _edit_config(d, lambda c: (c.update(num_hidden_layers=6), c.update(layer_types=c["layer_types"][:6])))
    _raises(d, "unexpected tensor", "model.layers.6.")


def test_duplicate_names(ckpts, tmp_path):
    def dup(k, v):
        return {k: v, "model.language_model." + k[len("model."):]: v.clone()} if k == "model.norm.weight" else k

    d = rename_checkpoint(ckpts("plain"), tmp_path / "ck", dup)
    _raises(d, "output_norm.weight")


def test_unsupported_tensor_dtype(ckpts, tmp_path):
    d = rename_checkpoint(ckpts("plain"), tmp_path / "ck", lambda k, v: k)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(sd, str(d / "model.safetensors"))
    _raises(d, "mlp.up_proj.weight", "I8")


@pytest.mark.parametrize("how", ["garbage_json", "huge_length", "truncated_data", "bad_offsets", "tiny"])
def test_corrupt_safetensors(ckpts, tmp_path, how):
    d = copy_ckpt(ckpts("plain"), tmp_path / "ck")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    if how == "garbage_json":
        data[8:18] = b"#garbage!!"
    elif how == "huge_length":
        data[:8] = struct.pack("<Q", len(data) * 4)
    elif how == "truncated_data":
        data = data[: 8 + hlen + 100]
    elif how == "bad_offsets":
        header = json.loads(data[8:8 + hlen])
        k = next(k for k in header if k != "__metadata__")
        header[k]["data_offsets"][1] += 4
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        data = bytearray(struct.pack("<Q", len(hb))) + hb + data[8 + hlen:]
    elif how == "tiny":
        data = data[:5]
    f.write_bytes(bytes(data))
    msg = _raises(d, str(f))
    assert any(w in msg for w in ("corrupt", "truncated")), msg


def test_source_dir_unchanged_after_conversion(ckpts, tmp_path):
    d = ckpts("bf16")
    before = dir_digest(d)
    listing = sorted(p.name for p in d.iterdir())
    to_bundle(d, tmp_path / "x.edgelm", scheme="int8")
    assert sorted(p.name for p in d.iterdir()) == listing
    assert dir_digest(d) == before


# ----------------------------------------------------------------------------- logits parity
# Runs once edgelm.runtime.engine (and the tokenizer it imports) is importable.

PARITY_CASES = ["plain", "linear", "softcap", "bf16", "attn_softcap"]
N_PROMPT = 45  # > 2 x sliding_window (16)


def _prompt(vocab: int, n: int = N_PROMPT, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [fx.BOS] + rng.integers(6, vocab, size=n - 1).tolist()


@pytest.fixture
def engine_cls():
    return pytest.importorskip("edgelm.runtime.engine", exc_type=ImportError).Engine


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_parity_with_transformers(engine_cls, ckpts, tmp_path, case):
    d = ckpts(case)
    bundle = to_bundle(d, tmp_path / f"{case}.edgelm")
    ref_model = fx.load_reference(d)
    ids = _prompt(ref_model.config.vocab_size)
    assert len(ids) > ref_model.config.sliding_window
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()
    eng = engine_cls(bundle, backend="numpy", max_tokens=256)
    try:
        got = eng.score(ids)
    finally:
        eng.close()
    assert got.dtype == np.float32 and got.shape == ref.shape
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{case}: max |edgelm - transformers| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("k", [1, 10, 17, 33])
@pytest.mark.parametrize("prefill_chunk", [256, 5])
def test_cache_consistency(engine_cls, ckpts, tmp_path, k, prefill_chunk):
    d = ckpts("plain")
    bundle = to_bundle(d, tmp_path / "plain.edgelm")
    eng = engine_cls(bundle, backend="numpy", max_tokens=256, prefill_chunk=prefill_chunk)
    try:
        ids = _prompt(eng.config.vocab_size, seed=k)
        full = eng.score(ids)
        s = eng.create_session()
        rows = [s.prefill(ids[:k], return_logits=True)]
        for tok in ids[k:]:
            rows.append(s.decode_step(tok)[None, :])
    finally:
        eng.close()
    inc = np.concatenate(rows, axis=0)
    # prefill(ids[:k]) gives rows 0..k-1; decode_step(ids[j]) gives row j
    assert inc.shape == full.shape
    tol = 1e-4 * max(1.0, float(np.abs(full).max()))
    err = float(np.abs(inc - full).max())
    assert err <= tol, f"k={k}: max |incremental - teacher-forced| = {err:.3g} > {tol:.3g}"
