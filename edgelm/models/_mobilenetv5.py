"""Gemma 3n's vision tower in numpy: MobileNet-V5 (timm's `mobilenetv5_300m_enc`), one image
[3, H, W] -> [tokens, 2048] features.

transformers builds the tower through timm (`TimmWrapperModel`); Gemma 3n reads
`last_hidden_state` ([1, 2048, 16, 16] for a 768 x 768 image) and flattens it to 256 tokens. This
module computes the same thing in float32 without timm or torch, equal to it to about 1e-6
relative. Nothing here is batched: one image at a time.

Layout. Activations are channels-last ([H, W, C]), so every 1x1 convolution is one GEMM through
`linear(x2d, W)` = x2d @ W.T. Full k x k convolutions (the stem and the "edge residual" blocks)
are GEMMs over im2col patches whose columns run (kernel row, kernel column, input channel): the
stored matrix is the PyTorch weight [out, in, kh, kw] transposed to [out, kh, kw, in] and
flattened to [out, kh*kw*in]. Depthwise convolutions (kernels stored [C, kh, kw]) are sums over
the kernel taps of shifted (strided) slices times a per-channel weight.

Padding. The Gemma 3n tower pads like TensorFlow's "SAME" (timm pad_type 'same'): a stride-1
convolution with an odd kernel pads (k - 1) / 2 on both sides; a strided one pads
max((ceil(n / s) - 1) * s + k - n, 0) in total, the smaller half before, so on even sizes a
stride-2 3x3 convolution pads nothing before and one row/column after, and a stride-2 5x5 pads
one before and two after. timm's other padding (pad_type '', used by `mobilenetv5_base` and
`mobilenetv5_300m`) is symmetric: ((s - 1) + (k - 1)) // 2 on each side ("symmetric" here).

Blocks (all norms are RMSNorm over channels with a weight and no bias, eps 1e-6 whatever the
HF config's rms_norm_eps says, since timm builds them with its default; every activation is
tanh-approximated GELU):

* stem: 3x3 stride-2 convolution with bias, norm, GELU.
* "er" (EdgeResidual / fused MBConv): k x k convolution (with the block's stride) to
  mid channels, norm, GELU; 1x1 convolution to out channels, norm; + input when it is a
  residual block (stride 1, same width).
* "uir" (Universal Inverted Residual): optional depthwise "start" conv + norm (no act); 1x1
  expansion + norm + GELU; optional depthwise "mid" conv + norm + GELU; 1x1 projection + norm;
  optional depthwise "end" conv + norm; times a per-channel layer-scale gamma; + input. The
  block's stride goes to the mid conv if there is one, else the start conv, else the end conv.
* "mqa" (mobile multi-query attention): x + gamma * attn(norm(x)). One key and one value head
  shared by all query heads. Keys and values may first be downsampled by a depthwise
  stride-`kv_stride` conv + norm each (same padding rules); then 1x1 projections q [heads *
  key_dim], k [key_dim], v [value_dim] (no biases); softmax(q.k / sqrt(key_dim)) over all
  key positions; heads concatenated (head major) and projected back with a 1x1 conv.
* MSFA (multi-scale fusion adapter): the outputs at the tap points (the ends of the last two
  stages) are brought to the first tap's resolution with nearest-neighbour upsampling
  (PyTorch's `interpolate(mode="nearest")`: source index floor(dst * in / out) in float32),
  concatenated on channels, run through a UIR with no depthwise convs, residual or layer
  scale (1x1 to 2 x channels, norm, GELU, 1x1 to hidden_size, norm), brought to the output
  resolution (16 x 16): an average pool when the size is a multiple of it (3x3 for 768 px), bilinear
  resampling (align_corners=False, no antialias) otherwise, and a final norm.

So the output grid is always msfa_output_resolution^2 (256) tokens, whatever the input size; the
processor feeds 768 x 768.

The architecture is data here (`_ARCHS`, our own encoding of timm's block lists), expanded by
`VisionConfig.from_hf` with timm's channel rounding; the expanded per-block list is what the
bundle stores, so nothing later needs timm.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..errors import BadInputError, FormatError
from ._config import FLOAT32_MAX, bad, check_float, check_int, config_from_dict, is_int

ARCH = "gemma3n vision"
TIMM_NORM_EPS = 1e-6  # timm's RmsNorm2d default; transformers' rms_norm_eps never reaches the tower
MAX_CHANNELS = 1 << 16
MAX_BLOCKS = 4096
MAX_KERNEL = 15
MAX_RESOLUTION = 4096
SQRT_2_OVER_PI = 0.7978845608028654
GELU_C = 0.044715
PADDINGS = ("same", "symmetric")  # timm pad_type 'same' and ''

# ---------------------------------------------------------------------------------------------
# architectures: timm's block lists as data
#
# One tuple per block, stages as lists:
#   ("er", kernel, stride, expansion, out_channels)
#   ("uir", start_dw_kernel, mid_dw_kernel, stride, expansion, out_channels)   (0 = no such conv)
#   ("mqa", heads, key_and_value_dim, kv_stride, kv_dw_kernel, stride, out_channels)
# Channel counts are before the channel multiplier; a stride on any block but a stage's first
# is ignored (timm's builder forces it to 1).


def _stage0():
    return [("er", 3, 2, 4.0, 128)] + [("er", 3, 1, 4.0, 128)] * 2


def _stage1():
    return [("uir", 3, 5, 2, 6.0, 256), ("uir", 5, 0, 1, 4.0, 256), ("uir", 3, 0, 1, 4.0, 256),
            ("uir", 5, 0, 1, 4.0, 256), ("uir", 3, 0, 1, 4.0, 256)]


def _arch_300m():
    return [
        _stage0(),
        _stage1(),
        [("uir", 5, 5, 2, 6.0, 640)] + [("uir", 5, 0, 1, 4.0, 640)] * 7 + [("uir", 0, 0, 1, 1.0, 640)]
        + [("mqa", 12, 64, 2, 3, 1, 640), ("uir", 0, 0, 1, 2.0, 640)] * 14,
        [("uir", 5, 5, 2, 6.0, 1280)] + [("mqa", 16, 96, 1, 3, 1, 1280), ("uir", 0, 0, 1, 2.0, 1280)] * 19,
    ]


def _arch_base():
    return [
        _stage0(),
        _stage1(),
        [("uir", 5, 5, 2, 6.0, 512)] + [("uir", 5, 0, 1, 4.0, 512)] * 2 + [("uir", 0, 0, 1, 1.0, 512)]
        + [("mqa", 8, 64, 1, 3, 2, 512), ("uir", 0, 0, 1, 2.0, 512)] * 6,
        [("uir", 5, 5, 2, 6.0, 1024)] + [("mqa", 16, 64, 1, 3, 1, 1024), ("uir", 0, 0, 1, 2.0, 1024)] * 7,
    ]


# name -> (stages, default padding, input size of timm's default config)
_ARCHS = {
    "mobilenetv5_300m_enc": (_arch_300m, "same", 768),
    "mobilenetv5_300m": (_arch_300m, "symmetric", 768),
    "mobilenetv5_base": (_arch_base, "symmetric", 256),
}
STEM_SIZE = 64
HIDDEN = 2048  # timm's MSFA output width (fixed in the encoder)
MSFA_EXPANSION = 2.0
MSFA_INDICES = (-2, -1)  # feature levels fused by the MSFA
MSFA_RESOLUTION = 16

# model_args (timm.create_model keyword arguments) we understand
_MODEL_ARGS = ("channel_multiplier", "pad_type", "msfa_output_resolution", "msfa_indices", "layer_scale_init_value",
               "stem_size", "fix_stem", "stem_bias", "drop_rate", "drop_path_rate")


def make_divisible(v: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of divisor (at least divisor), bumped up one
    step if that lost more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _round_channels(c: int, multiplier: float) -> int:
    return make_divisible(c * multiplier) if multiplier else c


# ---------------------------------------------------------------------------------------------
# config

_COMMON_KEYS = ("kind", "stage", "in_channels", "out_channels", "stride", "skip")
_KIND_KEYS = {
    "er": ("kernel_size", "mid_channels"),
    "uir": ("dw_start", "dw_mid", "dw_end", "mid_channels"),
    "mqa": ("num_heads", "key_dim", "value_dim", "kv_stride", "kv_kernel_size"),
}


@dataclass(frozen=True, kw_only=True)
class Block:
    """One block after channel rounding. Fields that do not apply to the kind stay 0 (and are
    left out of to_dict)."""

    kind: str  # "er" | "uir" | "mqa"
    stage: int  # timm stage (the HF name is blocks.<stage>.<index in stage>)
    in_channels: int
    out_channels: int
    stride: int = 1
    skip: bool = False  # residual add of the block input
    kernel_size: int = 0  # er: the expansion convolution's kernel
    mid_channels: int = 0  # er, uir: expanded width
    dw_start: int = 0  # uir: depthwise kernel sizes, 0 = absent
    dw_mid: int = 0
    dw_end: int = 0
    num_heads: int = 0  # mqa
    key_dim: int = 0
    value_dim: int = 0
    kv_stride: int = 1
    kv_kernel_size: int = 0  # mqa: the key/value downsampling kernel (used when kv_stride > 1)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _COMMON_KEYS + _KIND_KEYS[self.kind]}


def _block_from(d, i: int) -> Block:
    """Validate one block of the `blocks` field (a dict from a file, or a Block)."""
    label = f"blocks[{i}]"
    if isinstance(d, Block):
        d = d.to_dict() if d.kind in _KIND_KEYS else {"kind": d.kind}
    if not isinstance(d, dict):
        raise bad(label, "must be an object", d)
    kind = d.get("kind")
    if kind not in _KIND_KEYS:
        raise bad(f"{label}.kind", "must be 'er', 'uir' or 'mqa'", kind)
    allowed = _COMMON_KEYS + _KIND_KEYS[kind]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise FormatError(f"config field {label!r}: unknown fields {unknown} for a {kind!r} block")
    missing = [k for k in allowed if k not in d]
    if missing:
        raise FormatError(f"config field '{label}.{missing[0]}' is missing")

    def num(key: str, lo: int = 1, hi: int = MAX_CHANNELS) -> int:
        v = d[key]
        if not is_int(v) or not lo <= v <= hi:
            raise bad(f"{label}.{key}", f"must be an integer in [{lo}, {hi}]", v)
        return v

    kw = {"kind": kind, "stage": num("stage", 0, MAX_BLOCKS), "in_channels": num("in_channels"),
          "out_channels": num("out_channels"), "stride": num("stride", 1, 2)}
    if not isinstance(d["skip"], bool):
        raise bad(f"{label}.skip", "must be true or false", d["skip"])
    kw["skip"] = d["skip"]
    if kind == "er":
        kw["kernel_size"] = num("kernel_size", 1, MAX_KERNEL)
        kw["mid_channels"] = num("mid_channels")
    elif kind == "uir":
        for k in ("dw_start", "dw_mid", "dw_end"):
            kw[k] = num(k, 0, MAX_KERNEL)
        kw["mid_channels"] = num("mid_channels")
        if kw["stride"] > 1 and not (kw["dw_start"] or kw["dw_mid"] or kw["dw_end"]):
            raise bad(f"{label}.stride", "needs a depthwise conv to stride (dw_start, dw_mid or dw_end)",
                      kw["stride"])
    else:
        kw["num_heads"] = num("num_heads", 1, 1024)
        kw["key_dim"] = num("key_dim")
        kw["value_dim"] = num("value_dim")
        kw["kv_stride"] = num("kv_stride", 1, 2)
        kw["kv_kernel_size"] = num("kv_kernel_size", 1, MAX_KERNEL)
        if kw["stride"] != 1:
            raise bad(f"{label}.stride", "must be 1 for an attention block", kw["stride"])
        if kw["in_channels"] != kw["out_channels"]:
            raise bad(f"{label}.out_channels", f"must equal in_channels ({kw['in_channels']}) for an attention block",
                      kw["out_channels"])
    if kw["skip"] and (kw["stride"] != 1 or kw["in_channels"] != kw["out_channels"]):
        raise bad(f"{label}.skip", "needs stride 1 and in_channels == out_channels", True)
    return Block(**kw)


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """MobileNet-V5 fully expanded: stem, the block list (after timm's channel rounding), the
    MSFA taps and sizes. `from_hf` builds it from a Gemma 3n vision_config."""

    architecture: str = "mobilenetv5_300m_enc"  # informational: the timm architecture it came from
    image_size: int = 768  # the input size the tower is used at (the processor's); any size runs
    in_channels: int = 3
    stem_channels: int
    stem_kernel_size: int = 3
    stem_stride: int = 2
    stem_bias: bool = True
    padding: str = "same"  # "same" (TF-style, timm 'same') or "symmetric" (timm '')
    blocks: tuple[Block, ...]
    layer_scale: bool = True  # uir and mqa blocks multiply their branch by a per-channel gamma
    msfa_taps: tuple[int, ...]  # MSFA inputs: output after that many blocks (0 = the stem's)
    msfa_mid_channels: int
    msfa_output_resolution: int = MSFA_RESOLUTION
    hidden_size: int = HIDDEN
    norm_eps: float = TIMM_NORM_EPS

    def __post_init__(self):
        if not isinstance(self.architecture, str) or not self.architecture:
            raise bad("architecture", "must be a non-empty string", self.architecture)
        check_int(self, "image_size", hi=MAX_RESOLUTION * 8)
        check_int(self, "in_channels", hi=MAX_CHANNELS)
        check_int(self, "stem_channels", hi=MAX_CHANNELS)
        check_int(self, "stem_kernel_size", hi=MAX_KERNEL)
        check_int(self, "stem_stride", hi=2)
        check_int(self, "msfa_mid_channels", hi=MAX_CHANNELS)
        check_int(self, "msfa_output_resolution", hi=MAX_RESOLUTION)
        check_int(self, "hidden_size", hi=MAX_CHANNELS)
        check_float(self, "norm_eps")
        for f in ("stem_bias", "layer_scale"):
            if not isinstance(getattr(self, f), bool):
                raise bad(f, "must be true or false", getattr(self, f))
        if self.padding not in PADDINGS:
            raise bad("padding", "must be 'same' or 'symmetric'", self.padding)
        blocks = self.blocks
        if not isinstance(blocks, (list, tuple)) or not blocks or len(blocks) > MAX_BLOCKS:
            raise bad("blocks", f"must be a list of 1 to {MAX_BLOCKS} blocks", blocks)
        blocks = tuple(_block_from(b, i) for i, b in enumerate(blocks))
        prev_out, prev_stage = self.stem_channels, 0
        for i, b in enumerate(blocks):
            if b.in_channels != prev_out:
                raise bad(f"blocks[{i}].in_channels", f"must equal the previous output width ({prev_out})",
                          b.in_channels)
            if b.stage not in (prev_stage, prev_stage + 1) or (i == 0 and b.stage != 0):
                raise bad(f"blocks[{i}].stage", f"must be {prev_stage} or {prev_stage + 1} (stages run 0, 1, ...)"
                          if i else "must be 0 for the first block", b.stage)
            prev_out, prev_stage = b.out_channels, b.stage
        object.__setattr__(self, "blocks", blocks)
        taps = self.msfa_taps
        if (not isinstance(taps, (list, tuple)) or not taps
                or not all(is_int(t) and 0 <= t <= len(blocks) for t in taps)
                or any(a >= b for a, b in zip(taps, taps[1:]))):
            raise bad("msfa_taps", f"must be a non-empty increasing list of block counts in [0, {len(blocks)}]", taps)
        object.__setattr__(self, "msfa_taps", tuple(taps))

    # ------------------------------------------------------------------ derived

    @property
    def num_tokens(self) -> int:
        """Output tokens per image (256): the MSFA output grid, whatever the input size."""
        return self.msfa_output_resolution ** 2

    @property
    def output_grid(self) -> tuple[int, int]:
        return (self.msfa_output_resolution, self.msfa_output_resolution)

    @property
    def msfa_in_channels(self) -> int:
        return sum(self.stem_channels if t == 0 else self.blocks[t - 1].out_channels for t in self.msfa_taps)

    def feature_size(self, size: int) -> list[int]:
        """Spatial size along one axis after the stem and after each block, for input `size`."""
        n = _conv_geom(size, self.stem_kernel_size, self.stem_stride, self.padding)[2]
        out = [n]
        for b in self.blocks:
            if b.stride > 1:
                k = (b.kernel_size if b.kind == "er" else (b.dw_mid or b.dw_start or b.dw_end))
                n = _conv_geom(n, k, b.stride, self.padding)[2]
            out.append(n)
        return out

    # ------------------------------------------------------------------ (de)serialising

    @classmethod
    def from_hf(cls, d: dict) -> "VisionConfig":
        """From the "vision_config" object of a Gemma 3n config.json (Gemma3nVisionConfig):
        `architecture` (a timm name) and `model_args` (timm.create_model keyword arguments)
        decide the tower; hidden_size must be the tower's output width. Other keys
        (rms_norm_eps included: timm does not read it) are ignored."""
        if not isinstance(d, dict):
            raise FormatError(f"vision_config must be an object, got {d!r:.80}")
        arch = d.get("architecture", "mobilenetv5_300m_enc")
        if arch not in _ARCHS:
            raise bad("architecture", f"is not a supported vision tower (expected one of {sorted(_ARCHS)})", arch)
        stages_fn, padding, image_size = _ARCHS[arch]
        args = d.get("model_args")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise bad("model_args", "must be an object or null", args)
        args = {k: v for k, v in args.items() if v is not None}  # timm.create_model drops None (= default)
        unknown = sorted(set(args) - set(_MODEL_ARGS))
        if unknown:
            raise FormatError(f"config field 'model_args' has unsupported timm arguments {unknown} "
                              f"(supported: {', '.join(_MODEL_ARGS)})")

        def arg_num(key, default, *, integer=False):
            v = args.get(key, default)
            ok = is_int(v) if integer else (not isinstance(v, bool) and isinstance(v, (int, float)))
            if not ok or not math.isfinite(v) or v < 0 or abs(v) > FLOAT32_MAX:
                raise bad(f"model_args.{key}", "must be a non-negative " + ("integer" if integer else "number"), v)
            return v

        def arg_bool(key, default):
            v = args.get(key, default)
            if not isinstance(v, bool):
                raise bad(f"model_args.{key}", "must be true or false", v)
            return v

        mult = arg_num("channel_multiplier", 1.0)
        for key in ("drop_rate", "drop_path_rate"):  # training only
            arg_num(key, 0.0)
        arg_num("layer_scale_init_value", 1e-5)  # its value is the gammas' init; the gammas always exist
        stem = arg_num("stem_size", STEM_SIZE, integer=True)
        if stem < 1:
            raise bad("model_args.stem_size", "must be positive", stem)
        fix_stem = arg_bool("fix_stem", mult < 1.0)
        stem_bias = arg_bool("stem_bias", True)
        res = arg_num("msfa_output_resolution", MSFA_RESOLUTION, integer=True)
        if res < 1:
            raise bad("model_args.msfa_output_resolution", "must be positive", res)
        if "pad_type" in args:
            pt = args["pad_type"]
            if pt not in ("same", ""):
                raise bad("model_args.pad_type", "must be 'same' or ''", pt)
            padding = "same" if pt == "same" else "symmetric"

        if not fix_stem:
            stem = _round_channels(stem, mult)
        blocks: list[Block] = []
        in_ch = stem
        stage_end: list[int] = []
        for s, stage in enumerate(stages_fn()):
            for j, spec in enumerate(stage):
                blocks.append(_expand(spec, s, j, in_ch, mult))
                in_ch = blocks[-1].out_channels
            stage_end.append(len(blocks))

        # timm's feature levels: the stem (when the first block strides), then each stage whose
        # successor starts with a stride (and the last). The MSFA takes levels by index; its
        # forward pass then counts the stem as 0 and stage k's end as k.
        stages = stages_fn()
        levels = [0] if _first_stride(stages[0][0]) > 1 else []
        levels += [k + 1 for k in range(len(stages))
                   if k + 1 == len(stages) or _first_stride(stages[k + 1][0]) > 1]
        idx = args.get("msfa_indices", MSFA_INDICES)
        if is_int(idx):
            if not 0 < idx <= len(levels):
                raise bad("model_args.msfa_indices", f"must be in 1..{len(levels)}", idx)
            idx = list(range(len(levels) - idx, len(levels)))
        if not isinstance(idx, (list, tuple)) or not idx or not all(is_int(i) for i in idx):
            raise bad("model_args.msfa_indices", "must be a list of integers", idx)
        take = [len(levels) + i if i < 0 else i for i in idx]
        if any(not 0 <= t < len(levels) for t in take) or len(set(take)) != len(take):
            raise bad("model_args.msfa_indices", f"must name distinct feature levels in [-{len(levels)}, "
                      f"{len(levels) - 1}]", idx)
        feats = sorted(take)  # the forward pass collects them in network order
        taps = [0 if f == 0 else stage_end[f - 1] for f in feats]
        msfa_in = sum(stem if t == 0 else blocks[t - 1].out_channels for t in taps)

        hidden = d.get("hidden_size", HIDDEN)
        if hidden != HIDDEN:
            raise bad("hidden_size", f"must be {HIDDEN} (the MobileNet-V5 tower's output width)", hidden)
        return cls(architecture=arch, image_size=image_size, stem_channels=stem, stem_bias=stem_bias,
                   padding=padding, blocks=tuple(blocks), layer_scale=True, msfa_taps=tuple(taps),
                   msfa_mid_channels=make_divisible(msfa_in * MSFA_EXPANSION), msfa_output_resolution=res,
                   hidden_size=HIDDEN)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return config_from_dict(cls, d, ARCH)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["blocks"] = [b.to_dict() for b in self.blocks]
        d["msfa_taps"] = list(self.msfa_taps)
        return d


def _first_stride(spec) -> int:
    return spec[2] if spec[0] in ("er",) else (spec[3] if spec[0] == "uir" else spec[5])


def _expand(spec, stage: int, j: int, in_ch: int, mult: float) -> Block:
    """One arch tuple -> Block, as timm's builder makes it (index j in its stage)."""
    kind = spec[0]
    if kind == "er":
        _, k, stride, e, c = spec
        stride = stride if j == 0 else 1
        out = _round_channels(c, mult)
        return Block(kind=kind, stage=stage, in_channels=in_ch, out_channels=out, stride=stride,
                     skip=stride == 1 and in_ch == out, kernel_size=k, mid_channels=make_divisible(in_ch * e))
    if kind == "uir":
        _, a, k, stride, e, c = spec
        stride = stride if j == 0 else 1
        out = _round_channels(c, mult)
        return Block(kind=kind, stage=stage, in_channels=in_ch, out_channels=out, stride=stride,
                     skip=stride == 1 and in_ch == out, dw_start=a, dw_mid=k, dw_end=0,
                     mid_channels=make_divisible(in_ch * e))
    _, h, dim, kv_stride, kk, stride, c = spec
    out = _round_channels(c, mult)
    # MobileAttention never strides; a stride on a non-first block is dropped by the builder
    return Block(kind=kind, stage=stage, in_channels=in_ch, out_channels=out, stride=1,
                 skip=in_ch == out, num_heads=h, key_dim=dim, value_dim=dim, kv_stride=kv_stride,
                 kv_kernel_size=kk)


# ---------------------------------------------------------------------------------------------
# tensors


class TowerTensor(NamedTuple):
    shape: tuple[int, ...]
    kind: str  # "linear": [out, in] used as x @ W.T (1x1 convs, attention projections, and k x k
    #            convs as [out, kh*kw*in], columns in (kernel row, kernel column, channel) order);
    #            "norm": RMSNorm weight [C]; "other": depthwise kernels [C, kh, kw], the stem bias,
    #            layer-scale gammas
    hf: str  # TimmWrapperModel.state_dict() key ("model.vision_tower." + hf in a checkpoint)


class _Entry(NamedTuple):
    shape: tuple[int, ...]
    kind: str
    hf: str
    hf_shape: tuple[int, ...]  # the PyTorch tensor's shape


def _conv_rows(name: str, hf: str, out_c: int, in_c: int, k: int, *, depthwise: bool = False,
               norm_hf: str | None = None):
    """A conv (no bias) and its norm: (canonical, _Entry) pairs."""
    if depthwise:
        e = _Entry((out_c, k, k), "other", hf + ".weight", (out_c, 1, k, k))
    else:
        e = _Entry((out_c, k * k * in_c), "linear", hf + ".weight", (out_c, in_c, k, k))
    rows = [(name + ".weight", e)]
    if norm_hf is not None:
        rows.append((name + "_norm.weight", _Entry((out_c,), "norm", norm_hf + ".weight", (out_c,))))
    return rows


@lru_cache(maxsize=16)
def _entries(cfg: VisionConfig) -> dict[str, _Entry]:
    out: dict[str, _Entry] = {}

    def add(rows):
        for name, e in rows:
            out[name] = e

    t = "timm_model."
    s = cfg.stem_channels
    add(_conv_rows("v.stem", t + "conv_stem.conv", s, cfg.in_channels, cfg.stem_kernel_size,
                   norm_hf=t + "conv_stem.bn"))
    if cfg.stem_bias:
        out["v.stem.bias"] = _Entry((s,), "other", t + "conv_stem.conv.bias", (s,))
    j = 0
    for n, b in enumerate(cfg.blocks):
        j = 0 if n == 0 or b.stage != cfg.blocks[n - 1].stage else j + 1
        p, h = f"v.blk.{n}.", f"{t}blocks.{b.stage}.{j}."
        ci, co, cm = b.in_channels, b.out_channels, b.mid_channels
        if b.kind == "er":
            add(_conv_rows(p + "exp", h + "conv_exp", cm, ci, b.kernel_size, norm_hf=h + "bn1"))
            add(_conv_rows(p + "pwl", h + "conv_pwl", co, cm, 1, norm_hf=h + "bn2"))
        elif b.kind == "uir":
            if b.dw_start:
                add(_conv_rows(p + "dw_start", h + "dw_start.conv", ci, 1, b.dw_start, depthwise=True,
                               norm_hf=h + "dw_start.bn"))
            add(_conv_rows(p + "pw_exp", h + "pw_exp.conv", cm, ci, 1, norm_hf=h + "pw_exp.bn"))
            if b.dw_mid:
                add(_conv_rows(p + "dw_mid", h + "dw_mid.conv", cm, 1, b.dw_mid, depthwise=True,
                               norm_hf=h + "dw_mid.bn"))
            add(_conv_rows(p + "pw_proj", h + "pw_proj.conv", co, cm, 1, norm_hf=h + "pw_proj.bn"))
            if b.dw_end:
                add(_conv_rows(p + "dw_end", h + "dw_end.conv", co, 1, b.dw_end, depthwise=True,
                               norm_hf=h + "dw_end.bn"))
        else:
            a = h + "attn."
            out[p + "attn_norm.weight"] = _Entry((ci,), "norm", h + "norm.weight", (ci,))
            add(_conv_rows(p + "attn_q", a + "query.proj", b.num_heads * b.key_dim, ci, 1))
            for kv, dim in (("k", b.key_dim), ("v", b.value_dim)):
                mod = a + ("key." if kv == "k" else "value.")
                if b.kv_stride > 1:
                    add(_conv_rows(p + f"attn_{kv}_down", mod + "down_conv", ci, 1, b.kv_kernel_size,
                                   depthwise=True, norm_hf=mod + "norm"))
                add(_conv_rows(p + f"attn_{kv}", mod + "proj", dim, ci, 1))
            add(_conv_rows(p + "attn_out", a + "output.proj", co, b.num_heads * b.value_dim, 1))
        if b.kind != "er" and cfg.layer_scale:
            out[p + "layer_scale"] = _Entry((co,), "other", h + "layer_scale.gamma", (co,))
    m = t + "msfa."
    add(_conv_rows("v.msfa.pw_exp", m + "ffn.pw_exp.conv", cfg.msfa_mid_channels, cfg.msfa_in_channels, 1,
                   norm_hf=m + "ffn.pw_exp.bn"))
    add(_conv_rows("v.msfa.pw_proj", m + "ffn.pw_proj.conv", cfg.hidden_size, cfg.msfa_mid_channels, 1,
                   norm_hf=m + "ffn.pw_proj.bn"))
    out["v.msfa.norm.weight"] = _Entry((cfg.hidden_size,), "norm", m + "norm.weight", (cfg.hidden_size,))
    return out


def tensor_table(cfg: VisionConfig) -> dict[str, TowerTensor]:
    """Canonical name -> TowerTensor for every weight of the tower, in network order:
    v.stem.*, v.blk.<n>.* (n counts blocks across stages), v.msfa.*. Per block:
    er: exp, exp_norm, pwl, pwl_norm; uir: [dw_start(_norm)], pw_exp(_norm), [dw_mid(_norm)],
    pw_proj(_norm), [dw_end(_norm)], layer_scale; mqa: attn_norm, attn_q, [attn_k_down(_norm)],
    attn_k, [attn_v_down(_norm)], attn_v, attn_out, layer_scale. Every HF tensor maps to exactly
    one entry (the model has no buffers)."""
    return {name: TowerTensor(e.shape, e.kind, e.hf) for name, e in _entries(cfg).items()}


def import_tensor(cfg: VisionConfig, name: str, array: np.ndarray) -> np.ndarray:
    """The state_dict tensor of `name` (float32) -> the stored array: k x k conv weights
    [out, in, kh, kw] -> [out, kh*kw*in]; 1x1 conv weights -> [out, in]; depthwise kernels
    [C, 1, kh, kw] -> [C, kh, kw]; 1-D tensors unchanged. There are no BatchNorm statistics to fold
    (every norm is an RMSNorm with a weight only)."""
    entries = _entries(cfg)
    if name not in entries:
        raise FormatError(f"the gemma3n vision tower has no tensor {name}")
    e = entries[name]
    a = np.asarray(array, dtype=np.float32)
    if tuple(a.shape) != e.hf_shape:
        raise FormatError(f"tensor {e.hf} ({name}) has shape {list(a.shape)}, the vision config implies "
                          f"{list(e.hf_shape)}")
    if e.kind == "linear" and len(e.hf_shape) == 4:
        a = a.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(a.reshape(e.shape), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# numerics

_SLAB = 1 << 22  # floats per im2col / attention-score slab (16 MB): fewer, larger GEMM calls
_CHUNK = 1 << 16  # floats per chunk of the memory-bound elementwise work (fits in L2)


def _default_linear(x, t):
    return x @ np.asarray(t, np.float32).T


def _conv_geom(n: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
    """(pad before, pad after, output size) of a conv along one axis of size n."""
    if padding == "symmetric":
        p = ((s - 1) + (k - 1)) // 2
        lo = hi = p
    elif s == 1 and (k - 1) % 2 == 0:
        lo = hi = (k - 1) // 2
    else:
        total = max((-(-n // s) - 1) * s + k - n, 0)
        lo, hi = total // 2, total - total // 2
    return lo, hi, (n + lo + hi - k) // s + 1


def _geom2(x: np.ndarray, k: int, s: int, padding: str):
    """((pad top, output rows), (pad left, output cols)) of a k x k stride-s conv on x [H, W, C]."""
    h, w = x.shape[:2]
    top, _, oh = _conv_geom(h, k, s, padding)
    left, _, ow = _conv_geom(w, k, s, padding)
    if oh < 1 or ow < 1:
        raise BadInputError(f"the image is too small for the vision tower (a {k}x{k} conv on {h} x {w})")
    return (top, oh), (left, ow)


def _tap_range(n_in: int, n_out: int, s: int, pad: int, tap: int, lo: int = 0, hi: int | None = None):
    """Outputs o in [lo, hi) whose input s*o + tap - pad lies inside [0, n_in): (first, end)."""
    hi = n_out if hi is None else hi
    off = tap - pad
    first = max(lo, -(off // s) if off < 0 else 0)  # ceil(-off / s)
    end = min(hi, (n_in - 1 - off) // s + 1) if n_in - 1 - off >= 0 else lo
    return first, max(first, end)


class _Kernels(NamedTuple):
    """The backend kernels encode() was given (None: numpy does that part)."""

    attend: object = None  # (q [n, heads, d], k [m, 1, d], v [m, 1, d]) -> [n, heads * d], q pre-scaled
    dwconv: object = None  # (x [H, W, C], taps [k, k, C], stride, top, left, (oh, ow)) -> [oh, ow, C]
    rmsnorm: object = None  # (rows [n, c], weight [c], eps, act) -> [n, c]; act None or "gelu"


# set by encode() for the duration of one call (per thread, so concurrent encodes keep theirs)
_KERNELS: contextvars.ContextVar = contextvars.ContextVar("edgelm_tower_kernels", default=_Kernels())


def _norm(x: np.ndarray, weight: np.ndarray, eps: float, act: bool = False) -> np.ndarray:
    """RMSNorm over the last axis, then GELU when `act`: in place (x must be a scratch array),
    in row chunks small enough to stay in cache; or the backend's kernel for both where
    encode() was given one."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    c = x.shape[-1]
    native = _KERNELS.get().rmsnorm
    if native is not None:
        y = native(x.reshape(-1, c), weight, eps, "gelu" if act else None)
        return np.asarray(y, dtype=np.float32).reshape(x.shape)
    x2 = x.reshape(-1, c)
    rows = max(1, _CHUNK // c)
    inv_c, e = np.float32(1.0 / c), np.float32(eps)
    tmp = np.empty((min(rows, x2.shape[0]), c), dtype=np.float32) if act else None
    for r0 in range(0, x2.shape[0], rows):
        blk = x2[r0:r0 + rows]
        ms = np.einsum("nc,nc->n", blk, blk)
        ms *= inv_c
        ms += e
        np.sqrt(ms, out=ms)
        np.divide(np.float32(1.0), ms, out=ms)
        blk *= ms[:, None]
        blk *= weight
        if act:
            _gelu(blk, tmp[:blk.shape[0]])
    return x


def _gelu(x: np.ndarray, t: np.ndarray) -> None:
    """tanh-approximated GELU of x in place (t: scratch of x's shape):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    np.multiply(x, x, out=t)
    t *= np.float32(GELU_C * SQRT_2_OVER_PI)
    t += np.float32(SQRT_2_OVER_PI)
    t *= x
    np.tanh(t, out=t)
    t += np.float32(1.0)
    t *= np.float32(0.5)
    x *= t


def _pointwise(x: np.ndarray, wt, linear) -> np.ndarray:
    h, w, c = x.shape
    y = linear(np.ascontiguousarray(x).reshape(h * w, c), wt)
    return np.ascontiguousarray(y, dtype=np.float32).reshape(h, w, -1)


def _conv_full(x: np.ndarray, wt, k: int, s: int, padding: str, linear) -> np.ndarray:
    """k x k convolution over all channels: GEMMs over im2col slabs of output rows, columns
    (i, j, c); padded positions are zeros."""
    h, w, c = x.shape
    (top, oh), (left, ow) = _geom2(x, k, s, padding)
    cols_n = k * k * c
    rows = max(1, _SLAB // max(1, ow * cols_n))
    out = None
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        cols = np.empty((r1 - r0, ow, cols_n), dtype=np.float32)
        for i in range(k):
            ra, rb = _tap_range(h, oh, s, top, i, r0, r1)
            for j in range(k):
                ca, cb = _tap_range(w, ow, s, left, j)
                t = (i * k + j) * c
                dst = cols[:, :, t:t + c]
                if (ra, rb, ca, cb) != (r0, r1, 0, ow):
                    dst[...] = 0.0
                if ra < rb and ca < cb:
                    dst[ra - r0:rb - r0, ca:cb] = x[s * ra + i - top:s * (rb - 1) + i - top + 1:s,
                                                    s * ca + j - left:s * (cb - 1) + j - left + 1:s]
        y = np.asarray(linear(cols.reshape(-1, cols_n), wt), dtype=np.float32)
        if out is None:
            out = np.empty((oh, ow, y.shape[1]), dtype=np.float32)
        out[r0:r1] = y.reshape(r1 - r0, ow, -1)
    return out


def _conv_dw(x: np.ndarray, kern: np.ndarray, s: int, padding: str) -> np.ndarray:
    """Depthwise convolution, kern [C, k, k]: a sum over taps of strided slices times a
    per-channel weight, each tap clipped to the outputs it reaches inside the image (so no padded
    copy), in bands of output rows that stay in cache; or the backend's kernel for the same sum
    where encode() was given one."""
    h, w, c = x.shape
    k = kern.shape[1]
    (top, oh), (left, ow) = _geom2(x, k, s, padding)
    taps = np.ascontiguousarray(kern.transpose(1, 2, 0))  # [k, k, C]
    dw = _KERNELS.get().dwconv
    if dw is not None:
        return np.asarray(dw(np.ascontiguousarray(x, dtype=np.float32), taps, s, top, left, (oh, ow)), np.float32)
    out = np.empty((oh, ow, c), dtype=np.float32)
    rows = max(1, 2 * _CHUNK // (ow * c))
    tmp = np.empty((min(rows, oh), ow, c), dtype=np.float32)
    col_ranges = [_tap_range(w, ow, s, left, j) for j in range(k)]
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        o = out[r0:r1]
        o[...] = 0.0
        for i in range(k):
            ra, rb = _tap_range(h, oh, s, top, i, r0, r1)
            if ra >= rb:
                continue
            band = x[s * ra + i - top:s * (rb - 1) + i - top + 1:s]
            for j, (ca, cb) in enumerate(col_ranges):
                if ca >= cb:
                    continue
                t = tmp[:rb - ra, :cb - ca]
                np.multiply(band[:, s * ca + j - left:s * (cb - 1) + j - left + 1:s], taps[i, j], out=t)
                o[ra - r0:rb - r0, ca:cb] += t
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's 'nearest' source rows: floor(dst * (in / out)) with a float32 scale."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _bilinear_weights(n_in: int, n_out: int):
    """align_corners=False, no antialias: (i0, i1, w0, w1) per output index."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def _resize_bilinear(x: np.ndarray, oh: int, ow: int) -> np.ndarray:
    h0, h1, a0, a1 = _bilinear_weights(x.shape[0], oh)
    w0, w1, b0, b1 = _bilinear_weights(x.shape[1], ow)
    b0, b1 = b0[None, :, None], b1[None, :, None]
    top = x[h0][:, w0] * b0 + x[h0][:, w1] * b1
    bot = x[h1][:, w0] * b0 + x[h1][:, w1] * b1
    return (top * a0[:, None, None] + bot * a1[:, None, None]).astype(np.float32)


def _er(cfg, w, linear, p: str, b: Block, x: np.ndarray) -> np.ndarray:
    eps = cfg.norm_eps
    y = _conv_full(x, w[p + "exp.weight"], b.kernel_size, b.stride, cfg.padding, linear)
    y = _norm(y, _f32(w, p + "exp_norm.weight"), eps, act=True)
    y = _norm(_pointwise(y, w[p + "pwl.weight"], linear), _f32(w, p + "pwl_norm.weight"), eps)
    if b.skip:
        y += x
    return y


def _uir(cfg, w, linear, p: str, x: np.ndarray, *, residual: bool, layer_scale: bool,
         dw=(0, 0, 0), stride: int = 1) -> np.ndarray:
    eps, pad = cfg.norm_eps, cfg.padding
    start, mid, end = dw
    y = x
    if start:
        y = _conv_dw(y, _f32(w, p + "dw_start.weight"), 1 if mid else stride, pad)
        y = _norm(y, _f32(w, p + "dw_start_norm.weight"), eps)
    y = _norm(_pointwise(y, w[p + "pw_exp.weight"], linear), _f32(w, p + "pw_exp_norm.weight"), eps, act=True)
    if mid:
        y = _conv_dw(y, _f32(w, p + "dw_mid.weight"), stride, pad)
        y = _norm(y, _f32(w, p + "dw_mid_norm.weight"), eps, act=True)
    y = _norm(_pointwise(y, w[p + "pw_proj.weight"], linear), _f32(w, p + "pw_proj_norm.weight"), eps)
    if end:
        y = _conv_dw(y, _f32(w, p + "dw_end.weight"), 1 if (start or mid) else stride, pad)
        y = _norm(y, _f32(w, p + "dw_end_norm.weight"), eps)
    if layer_scale:
        y *= _f32(w, p + "layer_scale")
    if residual:
        y += x
    return y


def _mqa(cfg, w, linear, p: str, b: Block, x: np.ndarray) -> np.ndarray:
    """Multi-query attention block. Every (position, head) row of q attends to all key
    positions; rows are processed in slabs, the softmax denominator applied to the output
    (or the backend's attention kernel, where encode() was given one)."""
    eps = cfg.norm_eps
    h, wd, _ = x.shape
    xn = _norm(x.copy(), _f32(w, p + "attn_norm.weight"), eps)
    q = _pointwise(xn, w[p + "attn_q.weight"], linear).reshape(h * wd * b.num_heads, b.key_dim)
    q *= np.float32(b.key_dim ** -0.5)
    kv = []
    for name, dim in (("k", b.key_dim), ("v", b.value_dim)):
        src = xn
        if b.kv_stride > 1:
            src = _conv_dw(xn, _f32(w, p + f"attn_{name}_down.weight"), b.kv_stride, cfg.padding)
            src = _norm(src, _f32(w, p + f"attn_{name}_down_norm.weight"), eps)
        kv.append(_pointwise(src, w[p + f"attn_{name}.weight"], linear).reshape(-1, dim))
    k, v = kv
    attend = _KERNELS.get().attend
    if attend is not None and b.key_dim == b.value_dim:  # the backend's attention kernel, one shared kv head
        n, hd = h * wd, b.key_dim
        o = attend(q.reshape(n, b.num_heads, hd), k.reshape(-1, 1, hd), v.reshape(-1, 1, hd))
        y = linear(np.ascontiguousarray(o, dtype=np.float32).reshape(n, b.num_heads * hd), w[p + "attn_out.weight"])
        return _mqa_out(cfg, w, p, b, x, y)
    kt = np.ascontiguousarray(k.T)
    o = np.empty((q.shape[0], b.value_dim), dtype=np.float32)
    rows = max(1, _SLAB // k.shape[0])
    for r0 in range(0, q.shape[0], rows):
        sc = q[r0:r0 + rows] @ kt
        sc -= sc.max(axis=-1, keepdims=True)
        np.exp(sc, out=sc)
        denom = sc.sum(axis=-1, keepdims=True)
        ob = o[r0:r0 + rows]
        np.matmul(sc, v, out=ob)
        ob /= denom
    y = linear(o.reshape(h * wd, b.num_heads * b.value_dim), w[p + "attn_out.weight"])
    return _mqa_out(cfg, w, p, b, x, y)


def _mqa_out(cfg, w, p: str, b: Block, x: np.ndarray, y) -> np.ndarray:
    h, wd, _ = x.shape
    y = np.ascontiguousarray(y, dtype=np.float32).reshape(h, wd, -1)
    if cfg.layer_scale:
        y *= _f32(w, p + "layer_scale")
    if b.skip:
        y += x
    return y


def _f32(w, name: str) -> np.ndarray:
    return np.asarray(w[name], dtype=np.float32)


def _msfa(cfg, w, linear, feats: list[np.ndarray]) -> np.ndarray:
    hh, hw = feats[0].shape[:2]
    parts = []
    for f in feats:
        if f.shape[0] < hh or f.shape[1] < hw:
            f = f[_nearest_index(f.shape[0], hh)][:, _nearest_index(f.shape[1], hw)]
        parts.append(f)
    x = np.concatenate(parts, axis=-1)
    y = _uir(cfg, w, linear, "v.msfa.", x, residual=False, layer_scale=False)
    r = cfg.msfa_output_resolution
    if (hh, hw) != (r, r):
        if hh % r or hw % r:
            y = _resize_bilinear(y, r, r)
        else:
            fh, fw = hh // r, hw // r
            y = y.reshape(r, fh, r, fw, -1).mean(axis=(1, 3), dtype=np.float32)
    return _norm(y, _f32(w, "v.msfa.norm.weight"), cfg.norm_eps)


def encode(cfg: VisionConfig, w, pixels: np.ndarray, linear=None, attend=None, dwconv=None, rmsnorm=None) -> np.ndarray:
    """One image's pixels float32 [3, H, W] (the processor's output) -> float32
    [num_tokens, hidden_size]: token t is grid cell (t // R, t % R) of the R x R MSFA output, i.e.
    transformers' last_hidden_state[0].reshape(hidden, R*R).T, before Gemma 3n's sqrt(hidden)
    scaling and embed_vision. attend, dwconv, rmsnorm: the backend's kernels for the
    attention, depthwise convolutions and RMSNorms (see _Kernels; None: numpy)."""
    token = _KERNELS.set(_Kernels(attend, dwconv, rmsnorm))
    try:
        return _encode(cfg, w, pixels, linear or _default_linear)
    finally:
        _KERNELS.reset(token)


def _encode(cfg: VisionConfig, w, pixels: np.ndarray, linear) -> np.ndarray:
    px = np.asarray(pixels, dtype=np.float32)
    if px.ndim != 3 or px.shape[0] != cfg.in_channels or px.shape[1] < 1 or px.shape[2] < 1:
        raise BadInputError(f"image pixels must be [{cfg.in_channels}, height, width], got shape {list(px.shape)}")
    x = np.ascontiguousarray(px.transpose(1, 2, 0))
    x = _conv_full(x, w["v.stem.weight"], cfg.stem_kernel_size, cfg.stem_stride, cfg.padding, linear)
    if cfg.stem_bias:
        x += _f32(w, "v.stem.bias")
    x = _norm(x, _f32(w, "v.stem_norm.weight"), cfg.norm_eps, act=True)
    taps = set(cfg.msfa_taps)
    feats = [x] if 0 in taps else []
    for n, b in enumerate(cfg.blocks):
        p = f"v.blk.{n}."
        if b.kind == "er":
            x = _er(cfg, w, linear, p, b, x)
        elif b.kind == "uir":
            x = _uir(cfg, w, linear, p, x, residual=b.skip, layer_scale=cfg.layer_scale,
                     dw=(b.dw_start, b.dw_mid, b.dw_end), stride=b.stride)
        else:
            x = _mqa(cfg, w, linear, p, b, x)
        if n + 1 in taps:
            feats.append(x)
        if n + 1 >= cfg.msfa_taps[-1]:
            break
    y = _msfa(cfg, w, linear, feats)
    return np.ascontiguousarray(y.reshape(-1, cfg.hidden_size), dtype=np.float32)
