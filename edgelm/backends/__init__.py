"""Backends are op tables. `get_backend(name)` returns one; models call its methods."""

from __future__ import annotations

import sys

from ..errors import BadInputError
from .numpy_ops import NumpyOps

BACKENDS = ("cpu", "numpy", "cuda", "auto")


def get_backend(name="cpu", threads: int | None = None, deterministic: bool | None = None):
    """The op table called `name`, or `name` itself when it is already a Backend instance
    (a backend defined outside edgelm)."""
    from .base import Backend

    if isinstance(name, Backend):
        ops = name
    elif name == "numpy":
        ops = NumpyOps()
    elif name == "cuda" or (name == "auto" and _gpu_present()):
        from . import cuda

        ops = cuda.CudaOps()
    elif name in ("cpu", "auto"):
        from . import cpu

        if cpu.available():
            ops = cpu.CpuOps()
        else:
            print(f"edgelm: native kernels unavailable ({cpu.unavailable_reason()}); using the numpy backend",
                  file=sys.stderr)
            ops = NumpyOps()
    else:
        raise BadInputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise BadInputError(f"threads must be a positive integer, got {threads!r}")
        ops.set_threads(threads)
    if deterministic is not None:
        ops.set_deterministic(deterministic)
    return ops


def _gpu_present() -> bool:
    """`auto`: the cuda backend where a GPU and the edgelm[cuda] extra are there, else cpu."""
    from . import cuda

    return cuda.gpu_present()
