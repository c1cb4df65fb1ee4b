"""Gemma 3n's vision tower in numpy (edgelm.models._mobilenetv5) against transformers / timm.

transformers builds the tower with timm (TimmWrapperModel around MobileNetV5Encoder); Gemma 3n
reads `vision_tower(pixel_values, do_pooling=False).last_hidden_state`. Narrow towers
(channel_multiplier 0.1) with every parameter re-randomised (so no branch is negligible: layer
scales O(0.5), norm scales 1 +- 0.2) must equal it to 1e-4 of the output's range, at several
input sizes, paddings and MSFA settings; a real front-end image (PNG -> preprocess_image) at the
processor's 768 px too; the full-size tower (slow) to 1e-3. The config and tensor table are
checked on their own (no timm needed there).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgelm.errors import BadInputError, FormatError
from edgelm.models import _mobilenetv5 as mv

try:
    import torch

    torch.set_num_threads(1)  # two torch threads ran small models 10-200x slower on the shared hosts
except ImportError:
    torch = None

sys.path.insert(0, str(Path(__file__).parent))

SMALL = {"channel_multiplier": 0.1}


@pytest.fixture(scope="module")
def hf():
    """(Gemma3nVisionConfig, AutoModel) with timm importable (tests/timm_support.py), or skip."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from timm_support import need_timm

    need_timm()
    from transformers import AutoModel, Gemma3nVisionConfig

    return Gemma3nVisionConfig, AutoModel


def _build(hf, architecture="mobilenetv5_300m_enc", model_args=None, seed=0):
    Config, AutoModel = hf
    hcfg = Config(architecture=architecture, model_args=model_args)
    torch.manual_seed(seed)
    return hcfg, AutoModel.from_config(hcfg).eval()


def _randomize(model, seed: int, full: bool = True) -> None:
    """Every parameter redrawn (full) or only the 1-D ones: conv / projection weights
    N(0, 1/fan_in), norm scales 1 + 0.2 N, layer-scale gammas U(0.2, 1), the stem bias 0.2 N."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale.gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif full:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))


def _weights(cfg: mv.VisionConfig, model) -> dict[str, np.ndarray]:
    sd = model.state_dict()
    return {n: mv.import_tensor(cfg, n, sd[t.hf].numpy()) for n, t in mv.tensor_table(cfg).items()}


def _reference(model, px: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(px)[None], do_pooling=False).last_hidden_state[0].numpy()
    return out.reshape(out.shape[0], -1).T  # [tokens, hidden], row-major grid


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape and ours.dtype == np.float32, (ours.shape, ours.dtype, ref.shape)
    assert np.isfinite(ours).all()
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())


def _pixels(size: int | tuple[int, int], seed: int = 0) -> np.ndarray:
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).uniform(-1, 1, (3, h, w)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("arch,args,size", [
    # 256 px: 128 -> 64 -> 32 -> 16 -> 8; MSFA upsamples 8 -> 16 (nearest), no pooling
    ("mobilenetv5_300m_enc", SMALL, 256),
    # odd sizes: 'same' padding of odd inputs, nearest 7 -> 13 (non-integer), bilinear 13 -> 16
    ("mobilenetv5_300m_enc", SMALL, (200, 232)),
    # symmetric padding (timm pad_type ''), bilinear downsampling 16 -> 12
    ("mobilenetv5_300m_enc", {**SMALL, "pad_type": "", "msfa_output_resolution": 12}, 256),
    # the stem as an MSFA input, a non-default stem width, None args (timm drops them)
    ("mobilenetv5_300m_enc", {**SMALL, "msfa_indices": [0, -1], "stem_size": 24, "drop_rate": None}, 96),
    # mobilenetv5_base: MobileNetV5 (not the encoder class), symmetric padding, no kv striding
    ("mobilenetv5_base", SMALL, 160),
])
def test_small_tower_matches_transformers(hf, arch, args, size):
    hcfg, model = _build(hf, arch, args)
    _randomize(model, seed=1)
    cfg = mv.VisionConfig.from_hf(hcfg.to_dict())
    px = _pixels(size, seed=2)
    ref = _reference(model, px)
    ours = mv.encode(cfg, _weights(cfg, model), px)
    assert ours.shape == (cfg.num_tokens, cfg.hidden_size)
    err = _rel_err(ours, ref)
    assert err < 1e-4, err


def test_front_end_image_matches_transformers(hf, tmp_path):
    """A generated PNG through edgelm's image front end (768 px, as the processor feeds it)."""
    pytest.importorskip("PIL")
    from PIL import Image, ImageDraw

    from edgelm.multimodal import load_image, preprocess_image

    yy, xx = np.mgrid[0:300, 0:420]
    rgb = np.stack([xx * 255 // 419, yy * 255 // 299, (xx * yy) % 256], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    ImageDraw.Draw(img).ellipse((60, 40, 250, 220), fill=(250, 30, 90), outline=(0, 0, 0), width=5)
    img.save(tmp_path / "img.png")
    px = preprocess_image(load_image(tmp_path / "img.png"))
    assert px.shape == (3, 768, 768) and px.dtype == np.float32 and px.min() >= -1 and px.max() <= 1

    hcfg, model = _build(hf, model_args=SMALL, seed=3)
    _randomize(model, seed=4)
    cfg = mv.VisionConfig.from_hf(hcfg.to_dict())
    ref = _reference(model, px)  # 768 px: 48 x 48 MSFA grid, 3x3 average pool to 16 x 16
    ours = mv.encode(cfg, _weights(cfg, model), px)
    assert ours.shape == (256, 2048)
    err = _rel_err(ours, ref)
    assert err < 1e-4, err


@pytest.mark.slow
def test_full_size_tower(hf):
    """The real architecture (294M parameters, transformers' random init with the layer scales and
    norm scales redrawn so every block matters) on one 768 px image."""
    hcfg, model = _build(hf, seed=5)
    _randomize(model, seed=6, full=False)
    cfg = mv.VisionConfig.from_hf(hcfg.to_dict())
    table = mv.tensor_table(cfg)
    sd = model.state_dict()
    assert {t.hf for t in table.values()} == set(sd) and len(table) == len(sd)
    px = _pixels(768, seed=7)
    t0 = time.perf_counter()
    ref = _reference(model, px)
    t_ref = time.perf_counter() - t0
    w = _weights(cfg, model)  # checks every HF shape
    del sd, model
    t0 = time.perf_counter()
    ours = mv.encode(cfg, w, px)
    t_ours = time.perf_counter() - t0
    err = _rel_err(ours, ref)
    print(f"full tower 768 px: rel err {err:.2e}, numpy {t_ours:.1f} s, torch (1 thread) {t_ref:.1f} s")
    assert err < 1e-3, err


# ---------------------------------------------------------------------------------------------
# tensor table


@pytest.mark.parametrize("arch", ["mobilenetv5_300m_enc", "mobilenetv5_base"])
def test_tensor_table_covers_state_dict(hf, arch):
    hcfg, model = _build(hf, arch, SMALL)
    cfg = mv.VisionConfig.from_hf(hcfg.to_dict())
    table = mv.tensor_table(cfg)
    sd = model.state_dict()
    derived_buffers: set[str] = set()  # MobileNet-V5 has none: every norm is an RMSNorm with a weight only
    assert {n for n, _ in model.named_buffers()} == derived_buffers
    hf_names = [t.hf for t in table.values()]
    assert len(hf_names) == len(set(hf_names))  # one HF tensor -> one canonical tensor
    assert set(hf_names) == set(sd) - derived_buffers
    assert list(table) == list(mv.tensor_table(cfg))  # stable order
    for name, t in table.items():
        assert name.startswith("v.")
        a = mv.import_tensor(cfg, name, sd[t.hf].numpy())
        assert a.shape == t.shape and a.dtype == np.float32 and a.flags.c_contiguous
        assert t.kind in ("linear", "norm", "other")
        if t.kind == "linear":
            assert a.ndim == 2 and a.size == sd[t.hf].numel()
        if t.kind == "norm":
            assert a.ndim == 1
    # a k x k conv is stored [out, kh*kw*in] with columns (i, j, c)
    w = sd[table["v.blk.1.exp.weight"].hf].numpy()
    a = mv.import_tensor(cfg, "v.blk.1.exp.weight", w)
    assert np.array_equal(a[:, (1 * 3 + 2) * w.shape[1] + 5], w[:, 5, 1, 2])
    with pytest.raises(FormatError, match=r"v\.stem\.weight.*\[64, 3, 3, 3\]"):
        mv.import_tensor(cfg, "v.stem.weight", np.zeros((64, 3, 3), np.float32))
    with pytest.raises(FormatError, match="v.nope"):
        mv.import_tensor(cfg, "v.nope", np.zeros(3, np.float32))


def test_full_size_table_from_config_alone():
    """The real tower's table (no timm): 84 blocks, 294,126,912 parameters, as transformers has."""
    cfg = mv.VisionConfig.from_hf({})
    table = mv.tensor_table(cfg)
    assert sum(math.prod(t.shape) for t in table.values()) == 294_126_912
    assert len(table) == 548
    assert table["v.blk.17.attn_q.weight"] == mv.TowerTensor((768, 640), "linear",
                                                             "timm_model.blocks.2.9.attn.query.proj.weight")
    assert table["v.blk.17.attn_k_down.weight"].shape == (640, 3, 3)
    assert "v.blk.45.attn_k_down.weight" not in table and table["v.blk.46.attn_k.weight"].shape == (96, 1280)
    assert table["v.msfa.pw_exp.weight"].shape == (3840, 1920)
    assert table["v.stem.weight"].shape == (64, 27)


class _Opaque:
    """A stand-in for a quantized matrix: only the `linear` callable can use it."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a


def test_linear_tensors_only_through_linear(hf):
    hcfg, model = _build(hf, model_args=SMALL, seed=8)
    _randomize(model, seed=9)
    cfg = mv.VisionConfig.from_hf(hcfg.to_dict())
    table = mv.tensor_table(cfg)
    w = _weights(cfg, model)
    px = _pixels(128, seed=10)
    plain = mv.encode(cfg, w, px)
    used: set[int] = set()

    def linear(x, t):
        assert isinstance(t, _Opaque) and x.dtype == np.float32 and x.ndim == 2
        used.add(id(t))
        return x @ t.a.T

    wrapped = {n: (_Opaque(a) if table[n].kind == "linear" else a) for n, a in w.items()}
    out = mv.encode(cfg, wrapped, px, linear=linear)
    np.testing.assert_array_equal(out, plain)
    assert used == {id(v) for v in wrapped.values() if isinstance(v, _Opaque)}  # every matrix used
    with pytest.raises(BadInputError, match="pixels"):
        mv.encode(cfg, w, px[:2])


# ---------------------------------------------------------------------------------------------
# config


def test_config_from_hf_defaults():
    cfg = mv.VisionConfig.from_hf({"architecture": "mobilenetv5_300m_enc", "model_args": None, "hidden_size": 2048,
                                   "rms_norm_eps": 1e-6, "model_type": "gemma3n_vision"})
    assert cfg == mv.VisionConfig.from_hf({})
    assert (cfg.image_size, cfg.num_tokens, cfg.output_grid, cfg.hidden_size) == (768, 256, (16, 16), 2048)
    assert cfg.stem_channels == 64 and cfg.padding == "same" and cfg.norm_eps == 1e-6
    assert len(cfg.blocks) == 84 and [sum(b.stage == s for b in cfg.blocks) for s in range(4)] == [3, 5, 37, 39]
    assert cfg.msfa_taps == (45, 84) and cfg.msfa_in_channels == 1920 and cfg.msfa_mid_channels == 3840
    assert cfg.feature_size(768) == [384] + [192] * 3 + [96] * 5 + [48] * 37 + [24] * 39
    b = cfg.blocks[3]
    assert (b.kind, b.dw_start, b.dw_mid, b.stride, b.in_channels, b.mid_channels, b.out_channels, b.skip) == \
        ("uir", 3, 5, 2, 128, 768, 256, False)
    q = cfg.blocks[17]
    assert (q.kind, q.num_heads, q.key_dim, q.kv_stride, q.skip) == ("mqa", 12, 64, 2, True)
    small = mv.VisionConfig.from_hf({"model_args": {"channel_multiplier": 0.1}})
    assert small.stem_channels == 64  # a multiplier < 1 leaves the stem alone (timm's fix_stem)
    assert [small.blocks[i].out_channels for i in (0, 3, 8, 45)] == [16, 24, 64, 128]
    wide = mv.VisionConfig.from_hf({"model_args": {"channel_multiplier": 1.5}})
    assert wide.stem_channels == 96
    base = mv.VisionConfig.from_hf({"architecture": "mobilenetv5_base"})
    assert (base.padding, base.image_size, len(base.blocks), base.msfa_taps) == ("symmetric", 256, 39, (24, 39))


def test_padding_geometry():
    """timm's 'same' pads a strided conv TF-style (extra on the far side), '' pads symmetrically."""
    assert mv._conv_geom(768, 3, 2, "same") == (0, 1, 384)  # the stem at 768 px
    assert mv._conv_geom(96, 5, 2, "same") == (1, 2, 48)
    assert mv._conv_geom(25, 3, 2, "same") == (1, 1, 13)
    assert mv._conv_geom(48, 5, 1, "same") == (2, 2, 48)
    assert mv._conv_geom(768, 3, 2, "symmetric") == (1, 1, 384)
    assert mv._conv_geom(96, 5, 2, "symmetric") == (2, 2, 48)


def test_config_round_trip():
    for d in ({}, {"model_args": {"channel_multiplier": 0.1, "pad_type": "", "msfa_indices": [0, -1]}},
              {"architecture": "mobilenetv5_base", "model_args": {"msfa_output_resolution": 8}}):
        cfg = mv.VisionConfig.from_hf(d)
        meta = json.loads(json.dumps(cfg.to_dict()))
        again = mv.VisionConfig.from_dict(meta)
        assert again == cfg and again.to_dict() == meta
        assert isinstance(again.blocks, tuple) and isinstance(again.msfa_taps, tuple)
        assert mv.tensor_table(again) == mv.tensor_table(cfg)


def test_config_from_transformers_to_dict(hf):
    Config, _ = hf
    for kw in ({}, {"model_args": SMALL}):
        d = Config(**kw).to_dict()
        cfg = mv.VisionConfig.from_hf(d)
        assert cfg == mv.VisionConfig.from_hf(json.loads(json.dumps(d)))
        assert cfg.architecture == "mobilenetv5_300m_enc"


@pytest.mark.parametrize("d,match", [
    ({"architecture": "resnet50"}, r"'architecture'.*'resnet50'"),
    ({"model_args": {"group_size": 4}}, r"model_args.*group_size"),
    ({"model_args": {"channel_multiplier": "wide"}}, r"'model_args\.channel_multiplier'.*'wide'"),
    ({"model_args": {"channel_multiplier": True}}, r"'model_args\.channel_multiplier'.*True"),
    ({"model_args": {"pad_type": "valid"}}, r"'model_args\.pad_type'.*'valid'"),
    ({"model_args": {"msfa_indices": [5]}}, r"'model_args\.msfa_indices'.*\[5\]"),
    ({"model_args": {"msfa_indices": [-1, 4]}}, r"'model_args\.msfa_indices'"),
    ({"model_args": {"msfa_output_resolution": 0}}, r"'model_args\.msfa_output_resolution'.*0"),
    ({"model_args": [1]}, r"'model_args'.*\[1\]"),
    ({"hidden_size": 1024}, r"'hidden_size'.*1024"),
])
def test_config_from_hf_errors(d, match):
    with pytest.raises(FormatError, match=match):
        mv.VisionConfig.from_hf(d)
    with pytest.raises(FormatError):
        mv.VisionConfig.from_hf([d])


def _meta(**changes):
    d = mv.VisionConfig.from_hf({"model_args": SMALL}).to_dict()
    d.update(changes)
    return d


def _block_meta(i, **changes):
    d = _meta()
    d["blocks"][i] = {**d["blocks"][i], **changes}
    return d


@pytest.mark.parametrize("d,match", [
    ({**_meta(), "colour": 1}, r"unknown fields \['colour'\]"),
    ({k: v for k, v in _meta().items() if k != "blocks"}, r"'blocks' is missing"),
    (_meta(padding="valid"), r"'padding'.*'valid'"),
    (_meta(norm_eps=-1.0), r"'norm_eps'.*-1\.0"),
    (_meta(stem_channels=0), r"'stem_channels'.*0"),
    (_meta(image_size="768"), r"'image_size'.*'768'"),
    (_meta(msfa_taps=[84, 45]), r"'msfa_taps'.*\[84, 45\]"),
    (_meta(msfa_taps=[85]), r"'msfa_taps'.*\[85\]"),
    (_meta(blocks=[]), r"'blocks'.*\[\]"),
    (_meta(layer_scale=1), r"'layer_scale'.*1"),
    (_block_meta(3, stride=3), r"'blocks\[3\]\.stride'.*3"),
    (_block_meta(3, kind="conv"), r"'blocks\[3\]\.kind'.*'conv'"),
    (_block_meta(3, in_channels=17), r"'blocks\[3\]\.in_channels'.*17"),
    (_block_meta(3, skip=True), r"'blocks\[3\]\.skip'"),
    (_block_meta(3, num_heads=4), r"blocks\[3\].*unknown fields \['num_heads'\]"),
    (_block_meta(17, kv_stride=0), r"'blocks\[17\]\.kv_stride'.*0"),
    (_block_meta(17, out_channels=32), r"'blocks\[17\]\.out_channels'.*32"),
    (_block_meta(0, stage=1), r"'blocks\[0\]\.stage'.*1"),
    (_block_meta(5, stage=3), r"'blocks\[5\]\.stage'.*3"),
])
def test_config_from_dict_errors(d, match):
    with pytest.raises(FormatError, match=match):
        mv.VisionConfig.from_dict(d)
