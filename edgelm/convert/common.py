"""The conversion pipeline shared by every importer.

An importer produces a `Source`: the architecture, its config dict, tokenizer blob and
special tokens, and a list of `SourceTensor`s under edgelm's canonical (GGUF-style) names,
with conversion-time transforms (such as folding Gemma's 1+w into norms) already applied
by their loaders. `convert()` then picks a scheme per tensor, quantizes one tensor at a
time, and writes the bundle atomically.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInputError
from ..format.bundle import TensorPlan, write_bundle
from ..quant.schemes import SCHEMES, QTensor, Scheme, get_scheme, quantize

LINEAR_SCHEMES = ("fp32", "fp16", "int8", "int8-b32", "int4-b32", "int4-b128")


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "linear", "embed", "ple" (per-layer embeddings), "norm" (1-D, always fp32), or "other" (kept fp32)
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`, transforms applied
    # Raw quantized data that maps onto an edgelm scheme without requantizing,
    # e.g. GGUF Q4_0 -> int4-b32: (scheme name, loader of the parts). The name "*" means the
    # loader makes parts for whatever scheme is planned: it is called with that Scheme
    # (synthetic weights, edgelm.convert.synthetic).
    passthrough: tuple[str, Callable[..., dict[str, np.ndarray]]] | None = None
    source_type: str = "F32"


@dataclass
class Source:
    arch: str
    config: dict
    tensors: list[SourceTensor]
    tokenizer_kind: str
    tokenizer_data: bytes
    special_tokens: dict
    chat_template: str | None
    description: dict = field(default_factory=dict)  # provenance: path, format, name
    add_bos: bool = True
    notes: list[str] = field(default_factory=list)
    # every file the importer reads (weights, config, tokenizer): the output may be none of them
    input_files: list[Path] = field(default_factory=list)


def default_chat_template() -> str:
    from importlib.resources import files

    return files("edgelm").joinpath("templates/gemma.jinja").read_text(encoding="utf-8")


TOWER_SCHEMES = ("fp32", "fp16", "int8")
DEFAULT_TOWER_SCHEME = "fp16"


def _pick(st: SourceTensor, scheme: str, embed_scheme: str, ple_scheme: str | None = None,
          tower_scheme: str = DEFAULT_TOWER_SCHEME) -> Scheme:
    if st.kind in ("norm", "other") or len(st.shape) == 1:
        return SCHEMES["fp32"]
    if st.kind == "tower":  # an image/audio tower's products (and its embedder's projection)
        return get_scheme(tower_scheme)
    if st.kind == "ple":
        s = get_scheme(ple_scheme or embed_scheme)
    else:
        s = get_scheme(embed_scheme if st.kind == "embed" else scheme)
    cols = int(np.prod(st.shape[1:]))
    if s.block > 0 and cols % s.block:
        # Rows that do not split into blocks fall back to per-channel int8 (or fp16),
        # the way GGUF k-quants fall back; the inspect table shows it.
        return SCHEMES["int8"] if s.weight_bits <= 8 else SCHEMES["fp16"]
    return s


def plan_tensors(src: Source, scheme: str, embed_scheme: str, ple_scheme: str | None = None,
                 tower_scheme: str = DEFAULT_TOWER_SCHEME) -> list[TensorPlan]:
    """ple_scheme: the scheme of the per-layer embedding table (kind "ple"; default: embed_scheme).
    tower_scheme: the scheme of the image/audio towers' products (kind "tower")."""
    for s in (scheme, embed_scheme, ple_scheme or embed_scheme):
        if s not in LINEAR_SCHEMES:
            raise BadInputError(f"unknown scheme {s!r}; choose one of {', '.join(LINEAR_SCHEMES)}")
    if tower_scheme not in TOWER_SCHEMES:
        raise BadInputError(f"unknown tower scheme {tower_scheme!r}; choose one of {', '.join(TOWER_SCHEMES)}")
    return [TensorPlan(st.name, _pick(st, scheme, embed_scheme, ple_scheme, tower_scheme), tuple(st.shape))
            for st in src.tensors]


def make_producer(src: Source, requantize: bool = False,
                  importance: dict[str, np.ndarray] | None = None) -> Callable[[TensorPlan], QTensor]:
    """`importance`: per-tensor, per-input-column weights of the squared quantization error
    (edgelm.runtime.imatrix), used by the int4 scale search; tensors without one get the
    unweighted search."""
    by_name = {st.name: st for st in src.tensors}
    importance = importance or {}

    def produce(plan: TensorPlan) -> QTensor:
        st = by_name[plan.name]
        if st.passthrough is not None and not requantize and st.passthrough[0] == plan.scheme.name:
            return QTensor(plan.scheme, plan.shape, st.passthrough[1]())
        if st.passthrough is not None and st.passthrough[0] == "*":
            return QTensor(plan.scheme, plan.shape, st.passthrough[1](plan.scheme))
        w = st.load()
        if tuple(w.shape) != tuple(plan.shape):
            raise BadInputError(f"tensor {plan.name}: loaded shape {w.shape}, expected {plan.shape}")
        imp = importance.get(plan.name)
        if imp is not None and len(plan.shape) > 1 and imp.size != int(np.prod(plan.shape[1:])):
            raise BadInputError(f"importance for {plan.name} has {imp.size} entries; its rows have "
                                f"{int(np.prod(plan.shape[1:]))} columns (was it collected on another model?)")
        if imp is not None:
            imp = imp.astype(np.float64)
            imp = (imp / max(float(imp.mean()), 1e-30) + 1e-3).astype(np.float32)  # no column counts for nothing
        return quantize(w, plan.scheme, imp)

    return produce


def check_importance(src: Source, plans: list[TensorPlan], importance: dict[str, np.ndarray],
                     requantize: bool = False) -> None:
    """Refuse an importance matrix that does not fit the model or leaves out a tensor that the
    int4 scale search would quantize with it: a partial matrix would quietly give those
    tensors the unweighted search."""
    by_name = {st.name: st for st in src.tensors}
    names = {p.name for p in plans}
    if not set(importance) & names:
        raise BadInputError("the importance file names none of this model's tensors (was it collected on another model?)")
    for p in plans:
        imp = importance.get(p.name)
        if imp is not None and len(p.shape) > 1 and imp.size != int(np.prod(p.shape[1:])):
            raise BadInputError(f"importance for {p.name} has {imp.size} entries; its rows have "
                                f"{int(np.prod(p.shape[1:]))} columns (was it collected on another model?)")
    needed = []
    for p in plans:
        st = by_name[p.name]
        kept = st.passthrough is not None and not requantize and st.passthrough[0] == p.scheme.name
        # products only: a table that is only ever looked up (Gemma 3n's per-layer embeddings)
        # has no activations to weigh
        if p.scheme.weight_bits == 4 and len(p.shape) > 1 and st.kind in ("linear", "embed") and not kept:
            needed.append(p.name)
    missing = [n for n in needed if n not in importance]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise BadInputError(
            f"the importance file covers {len(needed) - len(missing)} of the {len(needed)} tensors "
            f"quantized to 4 bits; missing: {shown} "
            f"(collect it again with `edgelm imatrix` on this model)")


def check_output_path(out: str | os.PathLike, inputs) -> None:
    """Refuse an output that is one of the source's input files: the same path, a symlink
    to one, or (for an existing output) a hard link to one. Writing it would destroy the
    source."""
    out = Path(out)
    real_out = os.path.realpath(out)
    try:
        st_out = os.stat(out)
    except OSError:
        st_out = None
    for f in inputs:
        same = os.path.realpath(f) == real_out
        if not same and st_out is not None:
            try:
                st = os.stat(f)
            except OSError:
                continue
            same = (st.st_dev, st.st_ino) == (st_out.st_dev, st_out.st_ino)
        if same:
            raise BadInputError(f"{out}: the output is the source's input file {f}; writing it would destroy "
                                "the source (choose another output path)")


def summarize(plans: list[TensorPlan]) -> list[tuple[str, int, int, int]]:
    """Rows of (scheme, tensor count, weights, bytes)."""
    agg: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for p in plans:
        n = int(np.prod(p.shape))
        rows, cols = (p.shape[0], n // p.shape[0]) if len(p.shape) > 1 else (1, n)
        nbytes = p.scheme.nbytes(rows, cols) if len(p.shape) > 1 else 4 * n
        a = agg[p.scheme.name]
        a[0] += 1
        a[1] += n
        a[2] += nbytes
    return [(k, v[0], v[1], v[2]) for k, v in sorted(agg.items(), key=lambda kv: -kv[1][2])]


def convert(
    src: Source,
    out: str | os.PathLike,
    scheme: str = "int8-b32",
    embed_scheme: str | None = None,
    requantize: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    ple_scheme: str | None = None,
    importance: dict[str, np.ndarray] | None = None,
    importance_meta: dict | None = None,
    tower_scheme: str = DEFAULT_TOWER_SCHEME,
) -> dict:
    """Quantize `src` and write a bundle at `out`. Returns a summary dict.
    ple_scheme: scheme of a per-layer embedding table (Gemma 3n; default: embed_scheme).
    importance: per-tensor column importance for the int4 scale search (see
    edgelm.runtime.imatrix); importance_meta is recorded in the bundle's header."""
    embed_scheme = embed_scheme or scheme
    out = Path(out)
    check_output_path(out, src.input_files)
    t0 = time.perf_counter()
    plans = plan_tensors(src, scheme, embed_scheme, ple_scheme, tower_scheme)
    has_towers = any(st.kind == "tower" for st in src.tensors)
    if importance:
        check_importance(src, plans, importance, requantize)
    meta = {
        "arch": src.arch,
        "config": src.config,
        "tokenizer": {"kind": src.tokenizer_kind, "blob": "tokenizer"},
        "chat_template": src.chat_template or default_chat_template(),
        "chat_template_origin": "source" if src.chat_template else "edgelm default (Gemma)",
        "special_tokens": src.special_tokens,
        "add_bos": src.add_bos,
        "sampler": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
        "quantization": {"scheme": scheme, "embed_scheme": embed_scheme, "requantize": requantize,
                         **({"ple_scheme": ple_scheme or embed_scheme} if any(st.kind == "ple" for st in src.tensors) else {}),
                         **({"tower_scheme": tower_scheme} if has_towers else {}),
                         **({"importance": importance_meta or {"tensors": len(importance)}} if importance else {})},
        "source": src.description,
        "notes": src.notes,
        "created_by": "edgelm",
    }
    bar = None
    if progress:
        from tqdm import tqdm

        def bar(items):
            return tqdm(items, desc=f"converting to {out.name}", unit="tensor", leave=False)

    size = write_bundle(out, meta, plans, make_producer(src, requantize, importance), {"tokenizer": src.tokenizer_data}, bar)
    n_weights = sum(int(np.prod(p.shape)) for p in plans)
    weight_bytes = sum(r[3] for r in summarize(plans))
    return {
        "path": str(out),
        "size": size,
        "tensors": len(plans),
        "weights": n_weights,
        "bits_per_weight": 8.0 * weight_bytes / max(n_weights, 1),
        "by_scheme": summarize(plans),
        "seconds": time.perf_counter() - t0,
    }
