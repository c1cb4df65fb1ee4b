"""MatFormer slicing of Gemma 3n: extract a smaller nested model (E2B or a custom
"mix-n-match" size) from an E4B checkpoint, at conversion time.

Gemma 3n E4B is a MatFormer: every FFN nests smaller FFNs (the first k channels of
gate/up and the first k columns of down form a trained sub-FFN), and the E2B model is the
E4B with FFN width 8192 in every layer and layers 20-24 skipped (Google's slicing table,
dataset google/gemma3n-slicing-configs, row "Config for official E2B Model": 30 layers,
FFN dims [2048*4]*30, layers skipped [20, 21, 22, 23, 24]; the published E2B config has
30 layers, intermediate_size 8192 and num_kv_shared_layers 10). See docs/gemma3n.md.

Spec grammar (`edgelm convert SRC --matformer SPEC`):

  e2b                 the official E2B slice (needs a 35-layer E4B-geometry source)
  LAYERS:WIDTHS       a custom slice
    LAYERS  "all", or the layers to KEEP as indices/ranges: "0-19,25-34"
    WIDTHS  "full" (keep every width), one width for every kept layer ("8192"), or one
            per kept layer; "WxN" repeats width W N times ("8192x20,16384x5,8192x10") and
            a width may be written as a product, as Google's slicing table does ("2_048*4")

Slicing: kept layers are renumbered 0..n-1; gate/up keep their first k rows and down its
first k columns; the per-layer embedding table keeps the column blocks and
per_layer_model_proj the row blocks of the kept layers; layer_types, the activation
sparsity pattern and the FFN widths follow the kept layers; num_kv_shared_layers becomes
the number of kept layers that were KV-shared. A slice that drops a layer whose KV cache a
kept shared layer reads is refused (its shared layers would read a different layer's KV).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..errors import BadInputError
from .common import Source, SourceTensor

E2B_SKIPPED = (20, 21, 22, 23, 24)
E2B_FFN = 8192
E4B_LAYERS = 35


@dataclasses.dataclass(frozen=True)
class Slice:
    keep: tuple[int, ...]  # source layer indices, ascending
    widths: tuple[int, ...] | None  # per kept layer; None = unchanged


def _bad(spec: str, why: str) -> BadInputError:
    return BadInputError(f"--matformer {spec!r}: {why}")


def _parse_layers(spec: str, text: str, n_layers: int) -> tuple[int, ...]:
    if text.strip().lower() == "all":
        return tuple(range(n_layers))
    keep: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise _bad(spec, f"layer list entry {part!r} is not an index or a range like 0-19")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise _bad(spec, f"layer range {part!r} runs backwards")
        if hi >= n_layers:
            raise _bad(spec, f"layer {hi} does not exist (the source has {n_layers} layers)")
        keep.update(range(lo, hi + 1))
    if not keep:
        raise _bad(spec, "no layers kept")
    return tuple(sorted(keep))


def _parse_widths(spec: str, text: str, n_kept: int) -> tuple[int, ...] | None:
    text = text.strip()
    if text.lower() == "full":
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip().replace("_", "").replace(" ", "")
        m = re.fullmatch(r"(\d+)(?:\*(\d+))?(?:x(\d+))?", part)
        if not m:
            raise _bad(spec, f"FFN width entry {part!r} is not a width, W*F or WxN")
        width = int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1)
        out.extend([width] * (int(m.group(3)) if m.group(3) else 1))
    if len(out) == 1:
        out = out * n_kept
    if len(out) != n_kept:
        raise _bad(spec, f"{len(out)} FFN widths for {n_kept} kept layers")
    return tuple(out)


def parse_spec(spec: str, config: dict) -> Slice:
    """A --matformer spec against a Gemma 3n config dict -> Slice (raises BadInputError)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError("--matformer needs a spec: e2b or LAYERS:FFN_WIDTHS")
    n = int(config["num_layers"])
    s = spec.strip()
    if s.lower() == "e2b":
        if n != E4B_LAYERS:
            raise _bad(spec, f"the E2B slice needs a {E4B_LAYERS}-layer E4B checkpoint; this one has {n} layers "
                             "(use a custom LAYERS:FFN_WIDTHS spec)")
        keep = tuple(i for i in range(n) if i not in E2B_SKIPPED)
        return Slice(keep, (E2B_FFN,) * len(keep))
    if s.count(":") != 1:
        raise _bad(spec, "expected 'e2b' or LAYERS:FFN_WIDTHS (e.g. 0-19,25-34:8192)")
    layers, widths = s.split(":")
    keep = _parse_layers(spec, layers, n)
    return Slice(keep, _parse_widths(spec, widths, len(keep)))


def sliced_config(config: dict, sl: Slice, spec: str = "") -> dict:
    """The Gemma 3n config dict of the slice (validated)."""
    from ..models.gemma3n import Gemma3nConfig

    cfg = Gemma3nConfig.from_dict(config)
    keep = sl.keep
    widths = sl.widths or tuple(cfg.intermediate_size[i] for i in keep)
    for i, k in zip(keep, widths):
        if not 0 < k <= cfg.intermediate_size[i]:
            raise _bad(spec, f"FFN width {k} for layer {i} must be in 1..{cfg.intermediate_size[i]} "
                             "(MatFormer slices only shrink)")
    first = cfg.first_kv_shared_layer
    src = cfg.kv_source()
    kept = set(keep)
    for i in keep:
        if i >= first and src[i] not in kept:
            raise _bad(spec, f"layer {src[i]} holds the KV cache that KV-shared layer {i} reads; keep it "
                             "(drop KV-shared layers instead, as the E2B slice does)")
    if not any(i < first for i in keep):
        raise _bad(spec, "every kept layer is KV-shared; keep the layers that compute K/V")
    d = cfg.to_dict()
    d["num_layers"] = len(keep)
    d["intermediate_size"] = list(widths)
    d["layer_types"] = [cfg.layer_types[i] for i in keep]
    d["activation_sparsity"] = [cfg.activation_sparsity[i] for i in keep]
    d["num_kv_shared_layers"] = sum(1 for i in keep if i >= first)
    try:
        new = Gemma3nConfig.from_dict(d)
    except BadInputError as e:
        raise _bad(spec, str(e)) from None
    # The renumbered shared layers must read the same (renumbered) producers as before.
    pos = {old: j for j, old in enumerate(keep)}
    new_src = new.kv_source()
    for j, old in enumerate(keep):
        if old >= first and new_src[j] != pos[src[old]]:
            raise _bad(spec, f"after slicing, shared layer {old} would read layer {keep[new_src[j]]}'s KV instead of "
                             f"layer {src[old]}'s")
    return new.to_dict()


def slice_source(src: Source, spec: str) -> Source:
    """A new Source for the MatFormer slice `spec` of a Gemma 3n source (lazy: every
    loader slices its tensor from the original loader when the converter asks for it)."""
    if src.arch != "gemma3n":
        raise BadInputError(f"--matformer applies to Gemma 3n checkpoints; this source is {src.arch!r}")
    sl = parse_spec(spec, src.config)
    new_cfg = sliced_config(src.config, sl, spec)
    from ..models.gemma3n import Gemma3nConfig, tensor_table

    old = Gemma3nConfig.from_dict(src.config)
    new = Gemma3nConfig.from_dict(new_cfg)
    P = old.hidden_size_per_layer_input
    by_name = {st.name: st for st in src.tensors}
    old_name = {(t.layer, t.field): name for name, t in tensor_table(old).items()}
    cols = np.concatenate([np.arange(i * P, (i + 1) * P) for i in sl.keep])
    out: list[SourceTensor] = []
    for name, t in tensor_table(new).items():
        st = by_name[old_name[(None if t.layer is None else sl.keep[t.layer], t.field)]]
        if t.field in ("gate", "up"):  # the first k rows (channels) of the FFN
            load = _sliced(st.load, lambda w, k=new.intermediate_size[t.layer]: w[:k])
        elif t.field == "down":  # the first k columns
            load = _sliced(st.load, lambda w, k=new.intermediate_size[t.layer]: w[:, :k])
        elif t.field == "ple":  # the kept layers' column blocks
            load = _sliced(st.load, lambda w: w[:, cols])
        elif t.field == "ple_proj":  # the kept layers' row blocks
            load = _sliced(st.load, lambda w: w[cols])
        else:
            load = st.load
        passthrough = st.passthrough if load is st.load else None
        out.append(SourceTensor(name, t.shape, t.kind, load, passthrough=passthrough, source_type=st.source_type))
    desc = dict(src.description)
    desc["matformer"] = {"spec": spec, "kept_layers": list(sl.keep), "ffn_widths": list(new.intermediate_size),
                         "source_layers": old.num_layers}
    note = (f"MatFormer slice {spec!r}: {new.num_layers} of {old.num_layers} layers kept "
            f"({new.num_kv_shared_layers} KV-shared), FFN widths {_widths_str(new.intermediate_size)}")
    notes = [*src.notes, note]
    return dataclasses.replace(src, config=new_cfg, tensors=out, description=desc, notes=notes)


def _sliced(load, fn):
    def f() -> np.ndarray:
        w = load()
        out = np.ascontiguousarray(fn(w), dtype=np.float32)
        del w
        return out
    return f


def _widths_str(ws) -> str:
    runs: list[list[int]] = []
    for w in ws:
        if runs and runs[-1][1] == w:
            runs[-1][0] += 1
        else:
            runs.append([1, w])
    return ",".join(f"{w}x{n}" if n > 1 else str(w) for n, w in runs)
