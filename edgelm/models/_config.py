"""What every model's frozen config dataclass shares: building one from bundle metadata, and
the field checks its __post_init__ runs (a config comes from a file, so every field is
checked for its JSON type and range; the message names the field and its value)."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from ..errors import FormatError

INT_MAX = 2**31 - 1  # the kernels take sizes as C ints
MAX_LAYERS = 1 << 16  # far beyond any real model; bounds what a config can make us allocate
FLOAT32_MAX = 3.4028234663852886e38  # the kernels compute in float32: a larger value is inf there


def config_from_dict(cls, d: dict, arch: str):
    """Build a config dataclass from bundle metadata, naming unknown or bad fields."""
    if not isinstance(d, dict):
        raise FormatError(f"config must be an object, got {d!r:.80}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise FormatError(f"config: unknown fields {sorted(unknown)} for {arch}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise FormatError(f"config field {missing[0]!r} is missing")
    try:
        return cls(**d)
    except TypeError as e:
        raise FormatError(f"config: {e}") from None


def bad(field: str, why: str, value) -> FormatError:
    return FormatError(f"config field {field!r} {why}, got {value!r:.80}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(cfg, field: str, lo: int = 1, hi: int = INT_MAX) -> int:
    """An integer field in [lo, hi]."""
    v = getattr(cfg, field)
    if not is_int(v):
        raise bad(field, "must be an integer", v)
    if v < lo:
        raise bad(field, "must be positive" if lo == 1 else f"must be at least {lo}", v)
    if v > hi:
        raise bad(field, f"must be at most {hi}", v)
    return v


def check_float(cfg, field: str, optional: bool = False, zero_ok: bool = False) -> float | None:
    """A number field, finite in float32 and positive (or >= 0 with zero_ok; or null with
    optional). Stored back as a float."""
    v = getattr(cfg, field)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(field, "must be a number" + (" or null" if optional else ""), v)
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise bad(field, "must be a finite number (within float32 range)", v)
    if v < 0 or (v == 0 and not zero_ok):
        raise bad(field, "must be positive" if not zero_ok else "must be >= 0", v)
    object.__setattr__(cfg, field, float(v))
    return float(v)


def check_bool(cfg, field: str) -> bool:
    v = getattr(cfg, field)
    if not isinstance(v, bool):
        raise bad(field, "must be true or false", v)
    return v


def check_layer_types(cfg, allowed: tuple[str, ...], default) -> tuple[str, ...]:
    """layer_types: a list of `allowed` names, one per layer; empty means default(num_layers)."""
    lt = cfg.layer_types
    if not isinstance(lt, (list, tuple)):
        raise bad("layer_types", "must be a list", lt)
    if not lt:
        lt = default(cfg.num_layers)
    bad_types = sorted({repr(t) for t in lt if not isinstance(t, str) or t not in allowed})
    if bad_types:
        raise FormatError(f"config field 'layer_types' has unknown layer types {', '.join(bad_types)} "
                          f"(expected {' or '.join(allowed)})")
    if len(lt) != cfg.num_layers:
        raise FormatError(f"config field 'layer_types' has {len(lt)} entries for {cfg.num_layers} layers")
    object.__setattr__(cfg, "layer_types", tuple(lt))
    return cfg.layer_types


def check_heads(cfg) -> None:
    if cfg.num_heads % cfg.num_kv_heads:
        raise FormatError(f"config field 'num_kv_heads' must divide num_heads: {cfg.num_heads} heads do not group "
                          f"over {cfg.num_kv_heads} kv heads")


def check_head_dim(cfg) -> None:
    if cfg.head_dim % 2:
        raise bad("head_dim", "must be even (RoPE rotates pairs of channels)", cfg.head_dim)


def check_tensor_shapes(expected: dict, bundle) -> None:
    """Every tensor `expected` (name -> (shape, kind)) names is in the bundle with that shape."""
    for name, (shape, _) in expected.items():
        if name not in bundle:
            raise FormatError(f"{bundle.path}: tensor {name} is missing (the config implies shape {list(shape)})")
        got = bundle.tensor_info(name)["shape"]
        if tuple(got) != tuple(shape):
            raise FormatError(f"{bundle.path}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")


# ----------------------------------------------------------------------------- layer pattern

LOCAL, GLOBAL = "local", "global"  # sliding-window and full-attention layers


def layer_pattern(n_layers: int, global_every: int) -> tuple[str, ...]:
    """Every `global_every`-th layer global, the rest sliding-window (Gemma 3: 6, Gemma 3n: 5)."""
    return tuple(GLOBAL if (i + 1) % global_every == 0 else LOCAL for i in range(n_layers))


# ----------------------------------------------------------------------------- tensor tables
#
# A model file describes its tensors as rows of TensorRow: the global ones (before and after
# the blocks) and the per-layer ones. Shapes are tuples of dimension names that the model's
# dims(cfg, layer) resolves. build_table turns the rows into the model's tensor table, which
# everything else (shape checks, weight loading, the importers, MatFormer slicing, synthetic
# weights) reads.


class TensorRow(NamedTuple):
    field: str  # the Weights (global rows) or Layer (per-layer rows) attribute it loads into
    name: str  # canonical (GGUF-style) name; per-layer rows: the part after "blk.N."
    hf: str  # Hugging Face name after the decoder prefix; per-layer rows: after "layers.N.";
    #          "{j}" marks parts stacked by rows into one tensor (dims "parts" of them)
    kind: str  # SourceTensor kind: embed, ple, linear, norm, other
    shape: tuple[str, ...]  # dimension names, resolved by the model's dims()


class Tensor(NamedTuple):
    shape: tuple[int, ...]
    kind: str
    hf: tuple[str, ...]  # the Hugging Face tensor(s) it is read from, stacked by rows when several
    layer: int | None  # the block it belongs to (None: a global tensor)
    field: str  # see TensorRow


def build_table(cfg, dims, first: tuple, per_layer: tuple, last: tuple, present=None) -> dict[str, Tensor]:
    """Canonical name -> Tensor for every tensor of the model, in bundle order: the `first`
    global rows, each layer's `per_layer` rows (those `present(i, row)` accepts), the `last`
    global rows. dims(cfg, layer) gives the dimension sizes (layer None for globals)."""
    out: dict[str, Tensor] = {}

    def add(row: TensorRow, d: dict, name: str, hf: str, layer) -> None:
        hfs = tuple(hf.format(j=j) for j in range(d["parts"])) if "{j}" in hf else (hf,)
        out[name] = Tensor(tuple(d[s] for s in row.shape), row.kind, hfs, layer, row.field)

    g = dims(cfg, None)
    for row in first:
        add(row, g, row.name, row.hf, None)
    for i in range(cfg.num_layers):
        d = dims(cfg, i)
        for row in per_layer:
            if present is None or present(i, row):
                add(row, d, f"blk.{i}.{row.name}", f"layers.{i}.{row.hf}", i)
    for row in last:
        add(row, g, row.name, row.hf, None)
    return out


def shapes_of(table: dict[str, Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind), in bundle order."""
    return {name: (t.shape, t.kind) for name, t in table.items()}
