"""The native CPU op table: the C++ kernels where they exist, numpy for the rest."""

from __future__ import annotations

import numpy as np

from ..quant.schemes import QTensor
from .numpy_ops import NumpyOps

try:
    from . import native as _native

    _ERR = None if _native.available() else "the extension did not import"
except Exception as e:  # pragma: no cover - depends on the build
    _native = None
    _ERR = f"{type(e).__name__}: {e}"


def available() -> bool:
    return _native is not None and _native.available()


def unavailable_reason() -> str:
    return _ERR or ""


class CpuOps(NumpyOps):
    name = "cpu"

    def __init__(self):
        super().__init__()
        self.isa = _native.ISA

    def set_threads(self, n: int) -> None:
        _native.set_threads(n)

    def matmul(self, x: np.ndarray, t: QTensor) -> np.ndarray:
        return _native.matmul(np.ascontiguousarray(x, dtype=np.float32), t)

    def embed(self, ids: np.ndarray, t: QTensor) -> np.ndarray:
        return _native.embed(np.ascontiguousarray(ids, dtype=np.int32), t)
