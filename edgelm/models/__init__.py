"""Models are found by convention: architecture "x" lives in edgelm/models/x.py and exports
ARCH, Config (a frozen dataclass with from_dict, checking its own fields), its tensor table
(GLOBAL_TENSORS, LAYER_TENSORS, FINAL_TENSORS rows, dims, tensor_table, tensor_shapes), its
layer pattern (GLOBAL_EVERY), the importers' hooks (TITLE, from_hf, GGUF_NAMES,
HF_SKIP_PREFIXES, HF_SKIPPED, optionally hf_unused), load_weights, cache_specs and forward. Every other module in this
package is a shared helper (a name starting with "_")."""

from __future__ import annotations

import importlib
import re

from ..errors import FormatError
from ._config import check_tensor_shapes


def get_model(arch: str):
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", arch):
        raise FormatError(f"invalid architecture name {arch!r}")
    try:
        return importlib.import_module(f"{__name__}.{arch}")
    except ModuleNotFoundError:
        raise FormatError(f"architecture {arch!r} is not supported by this edgelm") from None


def load_config(model, bundle):
    """The model config of `bundle`, checked against itself and the tensor table: any
    inconsistency is a FormatError naming the bundle and the field. (The metadata the engine
    reads, tokenizer, special tokens and sampler, is checked by runtime.engine.check_meta.)"""
    try:
        cfg = model.Config.from_dict(bundle.config)
    except FormatError as e:
        raise FormatError(f"{bundle.path}: {e}") from None
    check_tensor_shapes(model.tensor_shapes(cfg), bundle)  # every tensor present, with the config's shape
    return cfg
