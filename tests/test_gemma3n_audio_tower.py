"""Gemma 3n's audio tower (edgelm.models._gemma3n_audio) against transformers'
Gemma3nAudioEncoder: tiny random towers with every parameter re-randomised, clips with and
without padding, odd lengths, the real log-mel front end, the attention logit cap and
relative positions shown to matter, config (de)serialising and validation, and the tensor
table covering the encoder's state_dict."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # with 2 threads torch runs these tiny models far slower on small hosts

from edgelm.errors import BadInputError, FormatError  # noqa: E402
from edgelm.models._gemma3n_audio import (AudioConfig, TowerTensor, encode, import_tensor,  # noqa: E402
                                          tensor_table)
from edgelm.multimodal import Gemma3nAudioFeatures  # noqa: E402

TOL = 1e-4

# Non-persistent buffers of Gemma3nAudioEncoder that are pure functions of the config: the
# encoder recomputes them, so they have no canonical tensor (transformers keeps them out of
# state_dict too; if a version ever saved them, they would be left out here).
RECOMPUTED_BUFFERS = {"gradient_clipping", "q_scale", "local_causal_valid_mask", "softcap", "inv_timescales"}

# "main": the real geometry scaled down (128 mel bins, 3x3 stride-2 convs, right context 0),
# chunks of 4 with 4 past steps, a logit cap of 10 that the scaled-up q/k weights reach.
# "alt": everything else varied: uneven kernels and strides, right context, a large
# rms_norm_eps (used only by the light conv), active gradient clipping, reduction 3.
CONFIGS = {
    "main": dict(hidden_size=48, conf_num_hidden_layers=2, conf_num_attention_heads=4, sscp_conv_channel_size=[16, 8],
                 conf_attention_chunk_size=4, conf_attention_context_left=5, conf_attention_context_right=0,
                 conf_attention_logit_cap=10.0),
    "alt": dict(input_feat_size=40, hidden_size=32, conf_num_hidden_layers=2, conf_num_attention_heads=2,
                sscp_conv_channel_size=[6, 4], sscp_conv_kernel_size=[[3, 5], [2, 3]],
                sscp_conv_stride_size=[[2, 1], [3, 2]], sscp_conv_group_norm_eps=0.01, conf_attention_chunk_size=3,
                conf_attention_context_left=3, conf_attention_context_right=2, conf_conv_kernel_size=3,
                conf_reduction_factor=3, conf_residual_weight=0.7, rms_norm_eps=0.25, gradient_clipping=1.5,
                conf_attention_logit_cap=6.0),
}


def _randomise(model, seed: int) -> None:
    """Every parameter random: norm scales 1 +- 0.2, per_dim_scale around 0, matrices and
    kernels ~ N(0, 1/fan_in), q/k projections 3x larger so the logit cap bites."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("per_dim_scale"):
                p.copy_(0.5 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                gain = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(gain * noise / math.sqrt(p[0].numel()))


class Tower:
    def __init__(self, key: str, seed: int = 0):
        self.hf_config = transformers.Gemma3nAudioConfig(**CONFIGS[key])
        self.model = transformers.Gemma3nAudioEncoder(self.hf_config).eval()
        _randomise(self.model, seed)
        self.cfg = AudioConfig.from_hf(self.hf_config.to_dict())
        self.state = {k: v.detach().numpy().copy() for k, v in self.model.state_dict().items()}
        self.weights = {n: import_tensor(self.cfg, n, self.state[t.hf]) for n, t in tensor_table(self.cfg).items()}

    def reference(self, feats: np.ndarray, padding: np.ndarray):
        """transformers on a batch: feats [B, T, F], padding [B, T] (True = padded)."""
        with torch.no_grad():
            out = self.model(torch.from_numpy(feats), torch.from_numpy(padding))
        return out.last_hidden_state.numpy(), out.audio_mel_mask.numpy()


@pytest.fixture(scope="module")
def towers():
    return {key: Tower(key, seed=i) for i, key in enumerate(CONFIGS)}


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    scale = np.abs(ref).max()
    assert scale > 0
    return float(np.abs(ours - ref).max() / scale)


def _features(cfg: AudioConfig, frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((frames, cfg.input_feat_size)) * 2.0 - 3.0).astype(np.float32)


def _compare(tower: Tower, feats: np.ndarray, padding: np.ndarray | None, cfg: AudioConfig | None = None):
    """(relative error vs transformers, our mask, transformers' mask)."""
    pad = np.zeros(len(feats), bool) if padding is None else padding
    ref, ref_mask = tower.reference(feats[None], pad[None])
    ours, mask = encode(cfg or tower.cfg, tower.weights, feats, padding)
    assert ours.shape == (tower.cfg.output_length(len(feats)), tower.cfg.hidden_size)
    return _rel_err(ours, ref[0]), mask, ref_mask[0]


@pytest.mark.parametrize("key,frames,pad_start,pad_end", [
    ("main", 203, 0, 0),  # 102 -> 51 steps: 13 chunks of 4 (the last partial), 13 outputs
    ("main", 203, 0, 50),  # trailing padding, as a padded batch has it
    ("main", 61, 0, 0),
    ("main", 2, 0, 0),
    ("main", 160, 24, 0),  # leading padding: whole windows of padded keys (uniform attention)
    ("alt", 97, 0, 20),
    ("alt", 50, 0, 0),
    ("alt", 7, 0, 0),
])
def test_matches_transformers(towers, key, frames, pad_start, pad_end):
    tower = towers[key]
    feats = _features(tower.cfg, frames, seed=frames)
    padding = None
    if pad_start or pad_end:
        padding = np.zeros(frames, bool)
        padding[:pad_start] = True
        padding[frames - pad_end:] = True
    err, mask, ref_mask = _compare(tower, feats, padding)
    assert err < TOL
    assert mask.dtype == np.bool_ and np.array_equal(mask, ref_mask)
    if pad_start or pad_end:
        assert mask.any() and not mask.all()


def test_front_end_batch(towers):
    """1.3 s and 0.7 s of synthetic audio through Gemma3nAudioFeatures (padded together as a
    batch), then each clip alone through encode against transformers on the whole batch."""
    tower = towers["main"]
    rate = 16_000
    t = np.arange(int(1.3 * rate)) / rate
    rng = np.random.default_rng(7)
    long = 0.4 * np.sin(2 * np.pi * (220 + 400 * t) * t) + 0.05 * rng.standard_normal(t.size)
    short = 0.3 * np.sin(2 * np.pi * 660 * t[: int(0.7 * rate)]) + 0.05 * rng.standard_normal(int(0.7 * rate))
    feats, valid = Gemma3nAudioFeatures().batch([long.astype(np.float32), short.astype(np.float32)])
    assert feats.shape[2] == tower.cfg.input_feat_size and not valid[1].all()
    ref, ref_mask = tower.reference(feats, ~valid)
    for i in range(2):
        ours, mask = encode(tower.cfg, tower.weights, feats[i], ~valid[i])
        assert _rel_err(ours, ref[i]) < TOL
        assert np.array_equal(mask, ref_mask[i])
    assert ref_mask[1].any()  # the short clip's padding reached the output
    alone, _ = encode(tower.cfg, tower.weights, *Gemma3nAudioFeatures()(long.astype(np.float32)))
    assert alone.shape[0] > 0


@pytest.mark.parametrize("key,change", [
    ("main", dict(conf_attention_logit_cap=20.0)),  # the cap is active
    ("alt", dict(conf_attention_logit_cap=12.0)),
    ("alt", dict(rms_norm_eps=1e-6)),  # the light conv's eps differs from the other norms'
    ("alt", dict(gradient_clipping=1e10)),  # clipping is active
    ("alt", dict(conf_residual_weight=0.5)),
])
def test_mutated_config_fails(towers, key, change):
    tower = towers[key]
    feats = _features(tower.cfg, 97, seed=3)
    assert _compare(tower, feats, None)[0] < TOL
    assert _compare(tower, feats, None, dataclasses.replace(tower.cfg, **change))[0] > 100 * TOL


@pytest.mark.parametrize("key", list(CONFIGS))
def test_relative_positions_matter(towers, key):
    tower = towers[key]
    feats = _features(tower.cfg, 97, seed=4)
    ref, _ = tower.reference(feats[None], np.zeros((1, 97), bool))
    w = dict(tower.weights)
    for i in range(tower.cfg.conf_num_hidden_layers):
        name = f"a.blk.{i}.attn.pos.weight"
        w[name] = w[name][::-1].copy()  # the same embeddings, attached to the wrong heads/dims
    ours, _ = encode(tower.cfg, w, feats)
    assert _rel_err(ours, ref[0]) > 100 * TOL


class _Opaque:
    """A stand-in for a quantized matrix: only the `linear` callback can read it."""

    def __init__(self, a):
        self.a = a

    def __array__(self, *args, **kwargs):
        raise AssertionError("a linear tensor was read directly")


def test_linear_tensors_only_through_linear(towers):
    tower = towers["alt"]
    table = tensor_table(tower.cfg)
    w = {n: _Opaque(a) if table[n].kind == "linear" else a for n, a in tower.weights.items()}
    seen = []

    def linear(x, t):
        assert isinstance(t, _Opaque) and x.dtype == np.float32 and x.ndim == 2
        seen.append(id(t))
        return x @ t.a.T

    feats = _features(tower.cfg, 50, seed=5)
    ours, _ = encode(tower.cfg, w, feats, linear=linear)
    ref, _ = encode(tower.cfg, tower.weights, feats)
    assert np.array_equal(ours, ref)
    assert set(seen) == {id(a) for a in w.values() if isinstance(a, _Opaque)}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_tensor_table_covers_state_dict(towers, key):
    tower = towers[key]
    table = tensor_table(tower.cfg)
    buffers = {name for name, _ in tower.model.named_buffers()}
    assert {b.rsplit(".", 1)[-1] for b in buffers} == RECOMPUTED_BUFFERS
    hf = [t.hf for t in table.values()]
    assert len(hf) == len(set(hf))
    assert set(hf) == set(tower.state) - buffers
    assert all(name.startswith("a.") for name in table)
    assert list(table) == list(tensor_table(tower.cfg))  # stable order
    for name, t in table.items():
        assert isinstance(t, TowerTensor)
        a = tower.weights[name]
        assert a.shape == t.shape and a.dtype == np.float32 and a.flags.c_contiguous
        assert t.kind in ("linear", "norm", "other")
        assert len(t.shape) == {"linear": 2, "norm": 1}.get(t.kind, len(t.shape))
        if t.kind in ("linear", "norm"):
            np.testing.assert_array_equal(a.reshape(-1), tower.state[t.hf].reshape(-1))
    with pytest.raises(FormatError, match="a.blk.9.attn.q.weight"):
        import_tensor(tower.cfg, "a.blk.9.attn.q.weight", np.zeros(4, np.float32))
    with pytest.raises(FormatError, match="shape"):
        import_tensor(tower.cfg, "a.blk.0.attn.q.weight", np.zeros((3, 3), np.float32))


def test_config_round_trip():
    hf = transformers.Gemma3nAudioConfig(**CONFIGS["alt"]).to_dict()
    cfg = AudioConfig.from_hf(hf)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AudioConfig.from_dict(d) == cfg
    assert d["sscp_conv_kernel_size"] == [[3, 5], [2, 3]] and cfg.sscp_conv_kernel_size == ((3, 5), (2, 3))
    assert cfg.sscp_conv_channel_size == (6, 4) and cfg.gradient_clipping == 1.5
    # absent keys take transformers' defaults
    default = AudioConfig.from_hf({"model_type": "gemma3n_audio", "vocab_size": 128, "vocab_offset": 262272})
    assert default == AudioConfig()
    ref = transformers.Gemma3nAudioConfig().to_dict()
    for k, v in default.to_dict().items():
        assert json.loads(json.dumps(ref[k])) == v, k
    assert default.output_length(500) == 32


@pytest.mark.parametrize("d,field", [
    ({"hidden_size": -4}, "hidden_size"),
    ({"hidden_size": "48"}, "hidden_size"),
    ({"hidden_size": 50}, "conf_num_attention_heads"),
    ({"hidden_size": 27, "conf_num_attention_heads": 9}, "hidden_size"),  # odd: no sin/cos split
    ({"conf_num_hidden_layers": 2.0}, "conf_num_hidden_layers"),
    ({"conf_attention_chunk_size": 0}, "conf_attention_chunk_size"),
    ({"conf_attention_context_left": -1}, "conf_attention_context_left"),
    ({"conf_attention_logit_cap": 0}, "conf_attention_logit_cap"),
    ({"gradient_clipping": float("inf")}, "gradient_clipping"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"conf_residual_weight": True}, "conf_residual_weight"),
    ({"sscp_conv_channel_size": [128]}, "sscp_conv_channel_size"),
    ({"sscp_conv_kernel_size": [[3, 3]]}, "sscp_conv_kernel_size"),
    ({"sscp_conv_stride_size": [[2, 0], [2, 2]]}, "sscp_conv_stride_size"),
    ({"input_feat_size": 1, "sscp_conv_kernel_size": [[3, 4], [3, 3]]}, "sscp_conv_kernel_size"),
])
def test_bad_config(d, field):
    with pytest.raises(FormatError, match=repr(field)):
        AudioConfig.from_hf(d)
    with pytest.raises(FormatError, match=repr(field)):
        AudioConfig.from_dict(dict(AudioConfig().to_dict(), **d))


def test_from_dict_strict():
    d = AudioConfig().to_dict()
    with pytest.raises(FormatError, match="bogus"):
        AudioConfig.from_dict(dict(d, bogus=1))
    with pytest.raises(FormatError):
        AudioConfig.from_dict([1, 2])
    with pytest.raises(FormatError):
        AudioConfig.from_hf("not a dict")


def test_bad_input(towers):
    tower = towers["alt"]
    with pytest.raises(BadInputError, match="40"):
        encode(tower.cfg, tower.weights, np.zeros((10, 39), np.float32))
    with pytest.raises(BadInputError):
        encode(tower.cfg, tower.weights, np.zeros((0, 40), np.float32))
    with pytest.raises(BadInputError, match="padding"):
        encode(tower.cfg, tower.weights, np.zeros((10, 40), np.float32), np.zeros(9, bool))
