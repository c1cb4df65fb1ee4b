"""Gemma 3n's audio tower in numpy: log-mel frames -> one embedding per 160 ms of audio.

This is the USM-style conformer of transformers' `Gemma3nAudioEncoder`, computed in float32
on one clip (batch 1) and equal to it to a few 1e-6 (relative to the largest output). The pieces, in order:

* Sub-sample conv projection (SSCP). The [T, mel] frames are an image of one channel; two
  2-D convolutions (no bias) each pad the time axis at the end only (kernel_h - 1 rows, so
  frame t sees t .. t + kernel_h - 1) and the frequency axis by one bin on each side, then
  stride. Activations are kept channels-last ([time, freq, channels]) and every convolution is
  one GEMM over im2col patches whose columns run (in_channel, kernel_h, kernel_w): exactly the
  row-major flattening of the PyTorch weight [out, in, kh, kw], so the stored matrix is that
  weight reshaped to [out, in*kh*kw].
  After each convolution comes a *cumulative* group norm (one group, scale only, no bias):
  at output step t the mean is over every (freq, channel) value of steps 0..t, and the
  "variance" is the running sum, over steps s <= t, of the squared deviations of step s from
  step s's own running mean, divided by the same count. (This is not the true running
  variance; it is what transformers computes, so it is what we compute.) The padding mask
  plays no part here. ReLU follows. The [time, freq, channels] result is flattened per step
  (freq major) and projected to hidden_size.
* The frame padding mask is subsampled by taking the frame at t * (product of time strides).
* Conformer blocks, each: half-step FFN (RMSNorm, up x4, SiLU, down, RMSNorm, x residual
  weight, residual add); local self-attention (below); zeroing of padded steps; light conv
  (RMSNorm, linear to 2*hidden, GLU, causal depthwise conv over time, RMSNorm, SiLU, linear,
  residual add); a second half-step FFN; a final RMSNorm. Every residual stream input and
  several outputs are clamped to +-gradient_clipping (1e10 in real checkpoints: inert, but
  kept). All RMSNorms multiply by their weight as is (no 1 + w) and, except the two inside
  the light conv (which use rms_norm_eps), use a fixed eps of 1e-6 whatever the config says.
* Attention is chunked: queries are cut into blocks of `chunk` steps; block u attends to keys
  from u*chunk - P to u*chunk + chunk - 1 + R (P = context_left - 1 past steps, R =
  context_right future steps), key i being visible from query j when j - P <= i <= j + R and
  i is a real (unpadded) step inside the clip. Queries are scaled per dimension by
  head_dim^-0.5 / softplus(0) * softplus(per_dim_scale) (folded into one stored vector).
  The logit of (query j, key i) adds to q.k the term q . E[j - i], where E is a learned
  projection of a sinusoidal embedding of the relative distance j - i in [-R, P] (timescales
  1 .. 1e4 over hidden_size/2 sin and as many cos channels). Logits are soft-capped
  (cap * tanh(logit / cap)), masked to float32's lowest value (so a query with no visible
  key averages every value of its window uniformly, padding zeros included, as transformers
  does) and soft-maxed in float32.
* Time reduction: every conf_reduction_factor-th step is kept (with its mask), and padded
  steps of the output are set to zero.

Weights are read through `w[name]` with the canonical names of `tensor_table`; the
fully-connected ones (kind "linear", [out, in]) only through `linear(x, W)` = x @ W.T so a
caller can hand in quantized matrices and its own matmul.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import BadInputError, FormatError
from ._config import FLOAT32_MAX, MAX_LAYERS, bad, check_float, check_int, config_from_dict, is_int

ARCH = "gemma3n audio"
FIXED_NORM_EPS = 1e-6  # transformers builds every audio RMSNorm outside the light conv with its default eps
MAX_TIMESCALE = 1.0e4  # sinusoidal relative-position embedding: timescales 1 .. 1e4
SSCP_FREQ_PAD = 1  # both SSCP convolutions pad the frequency axis by one bin on each side
SSCP_LAYERS = 2


def _pairs(v) -> bool:
    return (isinstance(v, (list, tuple)) and len(v) == SSCP_LAYERS
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(is_int(x) and 1 <= x <= 1 << 16 for x in p)
                    for p in v))


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    """The fields of transformers' Gemma3nAudioConfig the encoder reads (same names and
    defaults)."""

    input_feat_size: int = 128  # mel bins per frame
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6  # only the light conv's two RMSNorms use it
    gradient_clipping: float = 1e10  # clamp bound on the residual streams
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13  # includes the query's own step: P = left - 1 past steps
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5  # light conv's depthwise kernel (causal)
    conf_reduction_factor: int = 4  # keep every n-th step at the end
    conf_residual_weight: float = 0.5  # FFN residual scale
    sscp_conv_channel_size: tuple[int, ...] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))  # (time, freq) per conv
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))

    def __post_init__(self):
        for f in ("input_feat_size", "hidden_size", "conf_attention_chunk_size", "conf_num_attention_heads",
                  "conf_conv_kernel_size", "conf_reduction_factor"):
            check_int(self, f)
        check_int(self, "conf_num_hidden_layers", hi=MAX_LAYERS)
        check_int(self, "conf_attention_context_left", lo=0)
        check_int(self, "conf_attention_context_right", lo=0)
        for f in ("rms_norm_eps", "gradient_clipping", "conf_attention_logit_cap", "sscp_conv_group_norm_eps"):
            check_float(self, f)
        check_float(self, "conf_residual_weight", zero_ok=True)
        if self.hidden_size % self.conf_num_attention_heads:
            raise bad("conf_num_attention_heads", f"must divide hidden_size ({self.hidden_size})",
                      self.conf_num_attention_heads)
        if self.hidden_size % 2:
            raise bad("hidden_size", "must be even (the position embedding has hidden_size/2 sin and cos channels)",
                      self.hidden_size)
        ch = self.sscp_conv_channel_size
        if not (isinstance(ch, (list, tuple)) and len(ch) == SSCP_LAYERS
                and all(is_int(c) and 1 <= c <= 1 << 16 for c in ch)):
            raise bad("sscp_conv_channel_size", f"must list {SSCP_LAYERS} positive channel counts", ch)
        object.__setattr__(self, "sscp_conv_channel_size", tuple(ch))
        for f in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            v = getattr(self, f)
            if not _pairs(v):
                raise bad(f, f"must list {SSCP_LAYERS} [time, freq] pairs of positive integers", v)
            object.__setattr__(self, f, tuple(tuple(p) for p in v))
        freq = self.input_feat_size
        for i, (_, kw) in enumerate(self.sscp_conv_kernel_size):
            if freq + 2 * SSCP_FREQ_PAD < kw:
                raise bad("sscp_conv_kernel_size", f"conv {i} is wider ({kw}) than its padded input "
                          f"({freq + 2 * SSCP_FREQ_PAD} bins)", [list(p) for p in self.sscp_conv_kernel_size])
            freq = _conv_out(freq + 2 * SSCP_FREQ_PAD, kw, self.sscp_conv_stride_size[i][1])

    # ------------------------------------------------------------------ derived

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.conf_num_attention_heads

    @property
    def max_past(self) -> int:
        return max(0, self.conf_attention_context_left - 1)

    @property
    def sscp_freq_dims(self) -> tuple[int, ...]:
        """Frequency bins after each SSCP convolution."""
        out, freq = [], self.input_feat_size
        for (_, kw), (_, sw) in zip(self.sscp_conv_kernel_size, self.sscp_conv_stride_size):
            freq = _conv_out(freq + 2 * SSCP_FREQ_PAD, kw, sw)
            out.append(freq)
        return tuple(out)

    @property
    def time_stride(self) -> int:
        return math.prod(s[0] for s in self.sscp_conv_stride_size)

    def output_length(self, frames: int) -> int:
        """Embeddings `encode` returns for `frames` input frames."""
        t = frames
        for (kh, _), (sh, _) in zip(self.sscp_conv_kernel_size, self.sscp_conv_stride_size):
            t = _conv_out(t + kh - 1, kh, sh)
        return -(-t // self.conf_reduction_factor)

    # ------------------------------------------------------------------ (de)serialising

    @classmethod
    def from_hf(cls, d: dict) -> "AudioConfig":
        """From the "audio_config" object of a Hugging Face config.json: the fields we read,
        transformers' defaults for absent ones; every other key is ignored."""
        if not isinstance(d, dict):
            raise FormatError(f"audio_config must be an object, got {d!r:.80}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_dict(cls, d: dict) -> "AudioConfig":
        return config_from_dict(cls, d, ARCH)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sscp_conv_channel_size"] = list(self.sscp_conv_channel_size)
        for k in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
            d[k] = [list(p) for p in getattr(self, k)]
        return d


def _conv_out(n: int, k: int, s: int) -> int:
    return (n - k) // s + 1


# ---------------------------------------------------------------------------------------------
# tensors


class TowerTensor(NamedTuple):
    shape: tuple[int, ...]
    kind: str  # "linear" ([out, in], used as x @ W.T), "norm" (1-D scale) or "other"
    hf: str  # key in Gemma3nAudioEncoder.state_dict() ("model.audio_tower." + hf in a checkpoint)


def _block_rows(cfg: AudioConfig) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """(canonical suffix, HF suffix, kind, shape) for one conformer block."""
    d, k = cfg.hidden_size, cfg.conf_conv_kernel_size
    rows = _ffw_rows("ffw_start", "ffw_layer_start", d)
    rows += [
        ("attn.norm.weight", "attention.pre_attn_norm.weight", "norm", (d,)),
        ("attn.q.weight", "attention.attn.q_proj.weight", "linear", (d, d)),
        ("attn.k.weight", "attention.attn.k_proj.weight", "linear", (d, d)),
        ("attn.v.weight", "attention.attn.v_proj.weight", "linear", (d, d)),
        ("attn.q_scale", "attention.attn.per_dim_scale", "other", (cfg.head_dim,)),
        ("attn.pos.weight", "attention.attn.relative_position_embedding.pos_proj.weight", "linear", (d, d)),
        ("attn.out.weight", "attention.post.weight", "linear", (d, d)),
        ("attn.post_norm.weight", "attention.post_norm.weight", "norm", (d,)),
        ("conv.norm.weight", "lconv1d.pre_layer_norm.weight", "norm", (d,)),
        ("conv.in.weight", "lconv1d.linear_start.weight", "linear", (2 * d, d)),
        ("conv.dw.weight", "lconv1d.depthwise_conv1d.weight", "other", (d, k)),
        ("conv.dw_norm.weight", "lconv1d.conv_norm.weight", "norm", (d,)),
        ("conv.out.weight", "lconv1d.linear_end.weight", "linear", (d, d)),
    ]
    rows += _ffw_rows("ffw_end", "ffw_layer_end", d)
    rows.append(("norm.weight", "norm.weight", "norm", (d,)))
    return rows


def _ffw_rows(ours: str, hf: str, d: int):
    return [
        (f"{ours}.norm.weight", f"{hf}.pre_layer_norm.weight", "norm", (d,)),
        (f"{ours}.up.weight", f"{hf}.ffw_layer_1.weight", "linear", (4 * d, d)),
        (f"{ours}.down.weight", f"{hf}.ffw_layer_2.weight", "linear", (d, 4 * d)),
        (f"{ours}.post_norm.weight", f"{hf}.post_layer_norm.weight", "norm", (d,)),
    ]


def tensor_table(cfg: AudioConfig) -> dict[str, TowerTensor]:
    """Canonical name -> TowerTensor for every weight the encoder reads, in bundle order:
    a.sscp.* (the two convolutions as [out, in*kh*kw] matrices, their norm scales, the input
    projection), then a.blk.<i>.* per conformer block."""
    out: dict[str, TowerTensor] = {}
    c_in = 1
    for i, c in enumerate(cfg.sscp_conv_channel_size):
        kh, kw = cfg.sscp_conv_kernel_size[i]
        hf = f"subsample_conv_projection.conv_{i}"
        out[f"a.sscp.conv{i}.weight"] = TowerTensor((c, c_in * kh * kw), "linear", f"{hf}.conv.weight")
        out[f"a.sscp.conv{i}.norm.weight"] = TowerTensor((c,), "norm", f"{hf}.norm.weight")
        c_in = c
    out["a.sscp.proj.weight"] = TowerTensor((cfg.hidden_size, c_in * cfg.sscp_freq_dims[-1]), "linear",
                                            "subsample_conv_projection.input_proj_linear.weight")
    rows = _block_rows(cfg)
    for i in range(cfg.conf_num_hidden_layers):
        for ours, hf, kind, shape in rows:
            out[f"a.blk.{i}.{ours}"] = TowerTensor(shape, kind, f"conformer.{i}.{hf}")
    return out


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def import_tensor(cfg: AudioConfig, name: str, array: np.ndarray) -> np.ndarray:
    """A state_dict tensor (float32) -> the array stored under canonical `name`.

    Convolution weights are flattened to [out, in*kh*kw] (the depthwise one to [hidden,
    kernel]); the per-dimension query scale is stored as the full multiplier
    head_dim^-0.5 / softplus(0) * softplus(per_dim_scale); everything else is unchanged."""
    table = tensor_table(cfg)
    if name not in table:
        raise FormatError(f"gemma3n audio tower has no tensor {name}")
    t = table[name]
    a = np.asarray(array, dtype=np.float32)
    if a.size != math.prod(t.shape):
        raise FormatError(f"tensor {t.hf} ({name}) has shape {list(a.shape)}, the audio config implies "
                          f"{math.prod(t.shape)} values in {list(t.shape)}")
    if name.endswith(".attn.q_scale"):
        a64 = a.astype(np.float64).reshape(t.shape)
        a = cfg.head_dim ** -0.5 / math.log(2.0) * _softplus(a64)
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).reshape(t.shape))


# ---------------------------------------------------------------------------------------------
# forward


def _default_linear(x, t):
    return x @ np.asarray(t, np.float32).T


def _f32(w, name: str) -> np.ndarray:
    return np.asarray(w[name], dtype=np.float32)


# The backend's kernels for the duration of one encode() call (per thread): x * sigmoid(g)
# and RMSNorm; None: numpy
_SIGMOID_MUL: contextvars.ContextVar = contextvars.ContextVar("edgelm_audio_sigmoid_mul", default=None)
_RMSNORM: contextvars.ContextVar = contextvars.ContextVar("edgelm_audio_rmsnorm", default=None)


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    native = _RMSNORM.get()
    if native is not None:
        return np.asarray(native(np.ascontiguousarray(x, np.float32), scale, eps), dtype=np.float32)
    ms = np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps)
    return x * np.power(ms, np.float32(-0.5)) * scale


def _sigmoid_mul(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    native = _SIGMOID_MUL.get()
    if native is not None:
        return np.asarray(native(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(g, np.float32)),
                          dtype=np.float32)
    with np.errstate(over="ignore"):
        return x * (np.float32(1.0) / (np.float32(1.0) + np.exp(-g)))


def _silu(x: np.ndarray) -> np.ndarray:
    return _sigmoid_mul(x, x)


def _conv_slab_rows(cols: int) -> int:
    """Output time steps per im2col slab: keeps one slab's patches near 32 MB."""
    return max(1, (32 << 20) // (4 * max(1, cols)))


def _sscp_conv(x: np.ndarray, wmat, kernel, stride, linear) -> np.ndarray:
    """One SSCP convolution on channels-last x [T, F, C_in] -> [T', F', C_out]."""
    kh, kw = kernel
    sh, sw = stride
    t, f, _ = x.shape
    xp = np.pad(x, ((0, kh - 1), (SSCP_FREQ_PAD, SSCP_FREQ_PAD), (0, 0)))
    t_out = _conv_out(t + kh - 1, kh, sh)
    f_out = _conv_out(f + 2 * SSCP_FREQ_PAD, kw, sw)
    # [t_all, f_all, C_in, kh, kw] windows; strided to the outputs
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(0, 1))[::sh, ::sw][:t_out, :f_out]
    cols = win.shape[2] * kh * kw
    parts = []
    step = max(1, _conv_slab_rows(cols * f_out))
    for t0 in range(0, t_out, step):
        patches = win[t0:t0 + step].reshape(-1, cols)
        parts.append(linear(np.ascontiguousarray(patches, dtype=np.float32), wmat))
    y = np.concatenate(parts, axis=0)
    return y.reshape(t_out, f_out, -1).astype(np.float32, copy=False)


def _cumulative_group_norm(y: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """y [T, F, C]: normalise step t by the statistics of steps 0..t (see module docstring);
    statistics are accumulated in float64."""
    t = y.shape[0]
    count = np.arange(1, t + 1, dtype=np.float64) * (y.shape[1] * y.shape[2])
    mean = np.cumsum(y.sum(axis=(1, 2), dtype=np.float64)) / count
    dev = y - mean.astype(np.float32)[:, None, None]
    var = np.cumsum(np.square(dev).sum(axis=(1, 2), dtype=np.float64)) / count
    inv = (1.0 / np.sqrt(var + eps)).astype(np.float32)
    return dev * inv[:, None, None] * scale


def _sscp(cfg: AudioConfig, w, linear, feats: np.ndarray) -> np.ndarray:
    x = feats[:, :, None]  # [T, mel, 1]
    for i in range(SSCP_LAYERS):
        x = _sscp_conv(x, w[f"a.sscp.conv{i}.weight"], cfg.sscp_conv_kernel_size[i],
                       cfg.sscp_conv_stride_size[i], linear)
        x = _cumulative_group_norm(x, _f32(w, f"a.sscp.conv{i}.norm.weight"), cfg.sscp_conv_group_norm_eps)
        x = np.maximum(x, np.float32(0.0))
    return linear(np.ascontiguousarray(x.reshape(x.shape[0], -1)), w["a.sscp.proj.weight"])


def _ffw(cfg: AudioConfig, w, linear, p: str, x: np.ndarray, clip: np.float32) -> np.ndarray:
    h = _rms_norm(np.clip(x, -clip, clip), _f32(w, p + "norm.weight"), FIXED_NORM_EPS)
    h = linear(h, w[p + "up.weight"])
    h = linear(_silu(h), w[p + "down.weight"])
    h = _rms_norm(np.clip(h, -clip, clip), _f32(w, p + "post_norm.weight"), FIXED_NORM_EPS)
    return x + h * np.float32(cfg.conf_residual_weight)


def _timing_signal(cfg: AudioConfig) -> np.ndarray:
    """Sinusoidal embedding [P + R + 1, hidden] of the distances P, P-1, ..., -R (float32, as
    transformers computes it)."""
    n = cfg.hidden_size // 2
    step = math.log(MAX_TIMESCALE) / max(n - 1, 1)
    inv = np.exp(np.arange(n, dtype=np.float32) * np.float32(-step))
    pos = np.arange(cfg.max_past, -cfg.conf_attention_context_right - 1, -1).astype(np.float32)
    ang = pos[:, None] * inv[None, :]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=-1)


def _attention(cfg: AudioConfig, w, linear, p: str, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Chunked local attention on normed x [T, D]; returns the concatenated heads [T, D]."""
    t, d = x.shape
    n, hd = cfg.conf_num_attention_heads, cfg.head_dim
    chunk, past, fut = cfg.conf_attention_chunk_size, cfg.max_past, cfg.conf_attention_context_right
    ctx = chunk + past + fut
    blocks = -(-t // chunk)

    q = linear(x, w[p + "q.weight"]).reshape(t, n, hd) * _f32(w, p + "q_scale")
    k = linear(x, w[p + "k.weight"]).reshape(t, n, hd)
    v = linear(x, w[p + "v.weight"]).reshape(t, n, hd)

    # queries in blocks [N, U, W, H]; each block's key/value window [N, U, C, H]
    qb = np.pad(q, ((0, blocks * chunk - t), (0, 0), (0, 0))).reshape(blocks, chunk, n, hd).transpose(2, 0, 1, 3)
    win = np.arange(blocks)[:, None] * chunk + np.arange(ctx)[None, :]  # [U, C] into the padded sequence
    pads = ((past, fut + chunk - 1), (0, 0), (0, 0))
    kb = np.pad(k, pads)[win].transpose(2, 0, 1, 3)
    vb = np.pad(v, pads)[win].transpose(2, 0, 1, 3)
    key_ok = np.pad(valid, (past, fut + chunk - 1))[win]  # [U, C]: a real, unpadded step

    # window slot c of query w holds distance (query - key) = w + past - c, i.e. row c - w of
    # the embedding table (rows run over distances past .. -fut); visible iff 0 <= c - w <= past + fut
    rel = np.arange(ctx)[None, :] - np.arange(chunk)[:, None]  # [W, C]
    in_window = (rel >= 0) & (rel <= past + fut)
    pos = linear(_timing_signal(cfg), w[p + "pos.weight"]).reshape(-1, n, hd).transpose(1, 2, 0)  # [N, H, F]

    logits = qb @ kb.transpose(0, 1, 3, 2)  # [N, U, W, C]
    by_dist = qb @ pos[:, None]  # [N, U, W, F]
    logits += np.take_along_axis(by_dist, np.clip(rel, 0, past + fut)[None, None], axis=-1)
    cap = np.float32(cfg.conf_attention_logit_cap)
    logits = np.tanh(logits / cap) * cap
    visible = in_window[None, None] & key_ok[None, :, None, :]
    logits = np.where(visible, logits, np.finfo(np.float32).min)
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ vb  # [N, U, W, H]
    return out.transpose(1, 2, 0, 3).reshape(blocks * chunk, d)[:t]


def _light_conv(cfg: AudioConfig, w, linear, p: str, x: np.ndarray, clip: np.float32) -> np.ndarray:
    d, k = cfg.hidden_size, cfg.conf_conv_kernel_size
    h = linear(_rms_norm(x, _f32(w, p + "norm.weight"), cfg.rms_norm_eps), w[p + "in.weight"])
    h = _sigmoid_mul(h[:, :d], h[:, d:])
    kern = _f32(w, p + "dw.weight")  # [D, K]: tap j multiplies step t - (K - 1) + j
    hp = np.pad(h, ((k - 1, 0), (0, 0)))
    t = h.shape[0]
    acc = hp[0:t] * kern[:, 0]
    for j in range(1, k):
        acc += hp[j:j + t] * kern[:, j]
    acc = _rms_norm(np.clip(acc, -clip, clip), _f32(w, p + "dw_norm.weight"), cfg.rms_norm_eps)
    return x + linear(_silu(acc), w[p + "out.weight"])


def _block(cfg: AudioConfig, w, linear, i: int, x: np.ndarray, valid: np.ndarray, clip: np.float32) -> np.ndarray:
    p = f"a.blk.{i}."
    x = _ffw(cfg, w, linear, p + "ffw_start.", x, clip)
    a = p + "attn."
    h = _rms_norm(np.clip(x, -clip, clip), _f32(w, a + "norm.weight"), FIXED_NORM_EPS)
    h = linear(_attention(cfg, w, linear, a, h, valid), w[a + "out.weight"])
    x = x + _rms_norm(np.clip(h, -clip, clip), _f32(w, a + "post_norm.weight"), FIXED_NORM_EPS)
    x = x * valid[:, None].astype(np.float32)
    x = _light_conv(cfg, w, linear, p + "conv.", x, clip)
    x = _ffw(cfg, w, linear, p + "ffw_end.", x, clip)
    return _rms_norm(np.clip(x, -clip, clip), _f32(w, p + "norm.weight"), FIXED_NORM_EPS)


def encode(cfg: AudioConfig, w, features: np.ndarray, padding: np.ndarray | None = None,
           linear=None, sigmoid_mul=None, rmsnorm=None) -> tuple[np.ndarray, np.ndarray]:
    """One clip's log-mel frames [T, input_feat_size] (and padding [T], True = padded frame)
    -> (embeddings float32 [T', hidden_size], padded bool [T']); padded embeddings are zero.
    T' = cfg.output_length(T). sigmoid_mul: the backend's x * sigmoid(g) for the SiLU and GLU
    gates; rmsnorm: its rmsnorm(x, w, eps) for the blocks' norms (None: numpy)."""
    tokens = (_SIGMOID_MUL.set(sigmoid_mul), _RMSNORM.set(rmsnorm))
    try:
        return _encode(cfg, w, features, padding, linear or _default_linear)
    finally:
        _RMSNORM.reset(tokens[1])
        _SIGMOID_MUL.reset(tokens[0])


def _encode(cfg: AudioConfig, w, features, padding, linear) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != cfg.input_feat_size or feats.shape[0] < 1:
        raise BadInputError(f"audio features must be [frames, {cfg.input_feat_size}] with at least one frame, "
                            f"got shape {list(feats.shape)}")
    t_in = feats.shape[0]
    if padding is None:
        pad = np.zeros(t_in, dtype=bool)
    else:
        pad = np.asarray(padding)
        if pad.shape != (t_in,):
            raise BadInputError(f"audio padding mask must be [{t_in}], got shape {list(pad.shape)}")
        pad = pad.astype(bool)
    x = _sscp(cfg, w, linear, feats).astype(np.float32, copy=False)
    t = x.shape[0]
    pad = pad[np.minimum(np.arange(t) * cfg.time_stride, t_in - 1)]
    valid = ~pad
    clip = np.float32(min(cfg.gradient_clipping, FLOAT32_MAX))
    for i in range(cfg.conf_num_hidden_layers):
        x = _block(cfg, w, linear, i, x, valid, clip)
    r = cfg.conf_reduction_factor
    x, pad = x[::r], pad[::r]
    x = np.where(pad[:, None], np.float32(0.0), x).astype(np.float32, copy=False)
    return np.ascontiguousarray(x), np.ascontiguousarray(pad)
