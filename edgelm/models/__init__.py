"""Models are found by convention: architecture "x" lives in edgelm/models/x.py and exports
ARCH, Config (a frozen dataclass with from_dict), load_weights, make_caches and forward."""

from __future__ import annotations

import importlib
import re

from ..errors import FormatError


def get_model(arch: str):
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", arch):
        raise FormatError(f"invalid architecture name {arch!r}")
    try:
        return importlib.import_module(f"{__name__}.{arch}")
    except ModuleNotFoundError:
        raise FormatError(f"architecture {arch!r} is not supported by this edgelm") from None
