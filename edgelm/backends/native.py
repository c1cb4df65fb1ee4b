"""Python face of the native CPU kernels (edgelm/_native).

The extension is built once per instruction set (see setup.py). At import this module reads
the CPU's features from the portable `_kern_scalar` build and imports the best build the CPU
can run: avx512 > avx2 > scalar on x86-64, neon > scalar on aarch64. An ISA build is never
imported on a CPU that lacks it (its module init code may already use those instructions).
`vnniemu` (x86-64) is a test build: the AVX2 code with the avx512 build's VNNI dot-product
paths, vpdpbusd emulated exactly in AVX2. It is never picked automatically; it lets the tests
run the VNNI kernels on CPUs without VNNI.

    EDGELM_ISA=scalar|avx2|avx512|neon|vnniemu   force one build (falls back, with a warning,
                                          when the CPU or the build lacks it)
    EDGELM_QD8=auto|0|1                  activation path of integer schemes: auto (default:
                                          qd8 where the build has fast integer kernels, i.e.
                                          AVX2; docs/kernels.md), 0 = exact fp32 activations,
                                          1 = int8-quantized activations (qd8) everywhere

If nothing could be imported, `available()` is False and `unavailable_reason()` says why;
importing this module never raises.

API (threads are per process and shared by every call into the chosen build):

    ISA: str                                   the build in use ("none" when unavailable)
    matmul(x, t, out=None, qd8=None)           x [..., cols] float32 -> [..., rows]
    embed(ids, t) -> np.ndarray                ids [n] int -> [n, cols] float32
    rmsnorm, rope, rope_table, gelu_mul, softcap, attention   fused ops (see Kernels)
    stream_read_gbs(nbytes, threads, passes)   STREAM-style read bandwidth probe, GB/s
    set_qd8(mode), get_qd8()
    set_threads(n), get_threads(), default_threads()
    kernels(isa) -> Kernels                    one specific build (tests, benchmarks)
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import warnings
from types import ModuleType

import numpy as np

from ..quant.schemes import QTensor

ALL_ISAS = ("scalar", "avx2", "avx512", "neon", "vnniemu")
# Builds that the automatic choice considers, best first (the rest are for tests).
_AUTO = {"x86": ("avx512", "avx2", "scalar"), "arm": ("neon", "scalar")}

# CPU features each build needs (names as in cpu_features()).
_NEEDS = {
    "scalar": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avx2", "fma", "f16c"),
    "neon": ("neon",),
    "vnniemu": ("avx2", "fma", "f16c"),
}


def _machine_isas() -> tuple[str, ...]:
    """Builds setup.py makes on this architecture, best first; test-only builds last."""
    m = platform.machine().lower()
    if m in ("x86_64", "amd64", "x64"):
        return _AUTO["x86"] + ("vnniemu",)
    if m in ("aarch64", "arm64", "armv8l"):
        return _AUTO["arm"]
    return ("scalar",)


def _import(isa: str) -> ModuleType:
    return importlib.import_module(f"edgelm._native._kern_{isa}")


_SCALAR: ModuleType | None
_LOAD_ERROR: str | None = None
try:
    _SCALAR = _import("scalar")
    _FEATURES: dict[str, bool] = dict(_SCALAR.cpu_features())
except Exception as e:  # the extension was not built, or does not load
    _SCALAR = None
    _FEATURES = {}
    _LOAD_ERROR = f"edgelm._native._kern_scalar did not import ({type(e).__name__}: {e})"

_MODULES: dict[str, ModuleType] = {}


def cpu_features() -> dict[str, bool]:
    """Instruction-set support of this CPU and OS (empty when the extension is missing)."""
    return dict(_FEATURES)


def cpu_supports(isa: str) -> bool:
    """True when this CPU (and OS) can run the `isa` build; says nothing about whether it was built."""
    if isa not in _NEEDS:
        raise ValueError(f"unknown ISA {isa!r}; choose one of {', '.join(ALL_ISAS)}")
    if isa not in _machine_isas():
        return False
    return all(_FEATURES.get(f, False) for f in _NEEDS[isa])


def isa_unavailable_reason(isa: str) -> str | None:
    """None when the `isa` build can be used here, else a one-line reason."""
    if isa not in _NEEDS:
        return f"unknown ISA {isa!r}; choose one of {', '.join(ALL_ISAS)}"
    if _SCALAR is None:
        return _LOAD_ERROR
    if isa not in _machine_isas():
        return f"the {isa} build does not exist on {platform.machine()}"
    missing = [f for f in _NEEDS[isa] if not _FEATURES.get(f, False)]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if isa not in _MODULES:
        try:
            mod = _import(isa)
        except Exception as e:
            return f"edgelm._native._kern_{isa} did not import ({type(e).__name__}: {e})"
        _init_module(mod)
        _MODULES[isa] = mod
    return None


def _init_module(mod: ModuleType) -> None:
    """Per-build settings from the environment (EDGELM_QD8), applied when a build is imported."""
    env = os.environ.get("EDGELM_QD8", "").strip()
    if env and hasattr(mod, "set_qd8"):
        try:
            mod.set_qd8(_qd8_mode(env))
        except ValueError:
            pass  # warned about once at import


def available_isas() -> list[str]:
    """The builds that are present and runnable on this CPU, best first."""
    return [isa for isa in _machine_isas() if isa_unavailable_reason(isa) is None]


def default_threads() -> int:
    """Physical cores this process may use (cgroup CPU quota and affinity respected)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    n = len(cpus) or 1
    # Count distinct (package, core) pairs: SMT siblings share a core and its SIMD units.
    cores = set()
    try:
        for c in cpus:
            base = f"/sys/devices/system/cpu/cpu{c}/topology"
            with open(f"{base}/core_id") as f1, open(f"{base}/physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        if cores:
            n = min(n, len(cores))
    except OSError:
        pass
    # A container CPU quota (cgroup v2) bounds useful parallelism too.
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _weight_parts(t: QTensor) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    if not isinstance(t, QTensor):
        raise TypeError(f"expected a QTensor, got {type(t).__name__}")
    if len(t.shape) < 2:
        raise ValueError(f"native kernels need a 2-D weight, got shape {tuple(t.shape)}")
    rows, cols = t.rows, t.cols
    parts = t.parts
    key = "w" if t.scheme.id in (0, 1) else "q"
    if key not in parts:
        raise ValueError(f"{t.scheme.name} tensor has no {key!r} part (parts: {', '.join(parts)})")
    w = parts[key]
    if isinstance(w, np.ndarray) and w.ndim > 2 and w.flags.c_contiguous:
        w = w.reshape(rows, -1)  # a view: weights of 3-D+ tensors are stored [rows, ...]
    scale = None
    if key == "q":
        if "scale" not in parts:
            raise ValueError(f"{t.scheme.name} tensor has no 'scale' part")
        scale = parts["scale"]
    return w, scale, rows, cols


class Kernels:
    """The kernels of one ISA build."""

    def __init__(self, isa: str, module: ModuleType):
        self.isa = isa
        self.module = module

    def __repr__(self) -> str:
        return f"Kernels(isa={self.isa!r}, threads={self.get_threads()})"

    def set_threads(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"threads must be an int, got {type(n).__name__}")
        self.module.set_threads(int(n))

    def get_threads(self) -> int:
        return int(self.module.get_threads())

    def matmul(self, x: np.ndarray, t: QTensor, out: np.ndarray | None = None, qd8: bool | None = None) -> np.ndarray:
        """y = x @ W.T. x: float32 [..., cols], C-contiguous; returns float32 [..., rows]
        (into `out` when given: float32, C-contiguous, shape [..., rows]).
        qd8: None = the module setting (set_qd8 / EDGELM_QD8), True = int8-quantized
        activations, False = exact fp32 activations (integer schemes only)."""
        w, scale, rows, cols = _weight_parts(t)
        if not isinstance(x, np.ndarray):
            raise TypeError(f"matmul: x must be a numpy array, got {type(x).__name__}")
        if x.ndim == 0:
            raise ValueError("matmul: x must have at least one dimension")
        lead = x.shape[:-1]
        if x.ndim == 2:
            x2 = x
        elif x.ndim == 1:
            x2 = x[None, :]  # a view, never a copy
        elif x.flags.c_contiguous:
            x2 = x.reshape(-1, x.shape[-1])  # a view for C-contiguous x
        else:
            raise ValueError("matmul: x must be C-contiguous")
        if out is None:
            out = np.empty(lead + (rows,), dtype=np.float32)
        elif not isinstance(out, np.ndarray):
            raise TypeError(f"matmul: out must be a numpy array, got {type(out).__name__}")
        elif out.shape != lead + (rows,):
            raise ValueError(f"matmul: out must have shape {lead + (rows,)}, got {out.shape}")
        if out.ndim == 2:
            o2 = out
        elif out.ndim == 1:
            o2 = out[None, :]
        elif out.flags.c_contiguous:
            o2 = out.reshape(-1, rows)
        else:
            raise ValueError("matmul: out must be C-contiguous")
        self.module.matmul(x2, t.scheme.id, w, scale, rows, cols, o2, _qd8_arg(qd8))
        return out

    # ------------------------------------------------------------------ fused ops
    # Same semantics as NumpyOps (edgelm/backends/numpy_ops.py); inputs are converted to
    # C-contiguous float32 (int64 positions) here and validated again in C++.

    def set_qd8(self, mode) -> None:
        self.module.set_qd8(_qd8_mode(mode))

    def get_qd8(self) -> int:
        return int(self.module.get_qd8())

    def rmsnorm(self, x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None,
                act: int = 0) -> np.ndarray:
        """act: 0 none, 1 GELU (tanh approximation) of the normed rows (base.NORM_ACTS)."""
        x = _f32(x)
        if out is None:
            out = np.empty_like(x)
        self.module.rmsnorm(x, _f32(w), float(eps), out, int(act))
        return out

    def rope_table(self, positions, head_dim: int, theta: float, scale: float = 1.0):
        """(cos, sin) float32 [n, head_dim/2], computed exactly as NumpyOps.rope does."""
        hd = int(head_dim)
        inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
        inv = (inv / np.float32(scale)).astype(np.float32)
        ang = np.asarray(positions).astype(np.float32)[:, None] * inv[None, :]
        return np.ascontiguousarray(np.cos(ang)), np.ascontiguousarray(np.sin(ang))

    def rope(self, x: np.ndarray, positions, theta: float, scale: float = 1.0, table=None,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rotate-half RoPE of x [n, heads, hd] at `positions` [n]; `table` = rope_table(...)
        to reuse one table for many calls."""
        x = _f32(x)
        if x.ndim != 3:
            raise ValueError(f"rope: x must have shape (n, heads, head_dim), got {x.shape}")
        cos, sin = table if table is not None else self.rope_table(positions, x.shape[-1], theta, scale)
        if out is None:
            out = np.empty_like(x)
        self.module.rope(x, cos, sin, out)
        return out

    def _elementwise2(self, kernel, a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        a, b = _f32(a), _f32(b)
        if out is None:
            out = np.empty_like(a)
        kernel(a, b, out)
        return out

    def gelu_mul(self, g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._elementwise2(self.module.gelu_mul, g, u, out)

    def sigmoid_mul(self, x: np.ndarray, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x * sigmoid(g)."""
        return self._elementwise2(self.module.sigmoid_mul, x, g, out)

    def softcap(self, x: np.ndarray, cap: float, out: np.ndarray | None = None) -> np.ndarray:
        x = _f32(x)
        if out is None:
            out = np.empty_like(x)
        self.module.softcap(x, float(cap), out)
        return out

    def depthwise_conv2d(self, x, taps, stride: int, top: int, left: int, out_hw: tuple[int, int],
                         out: np.ndarray | None = None) -> np.ndarray:
        """x [H, W, C], taps [k, k, C] -> [oh, ow, C]: a channels-last depthwise convolution
        with the padding given by (top, left) (padded positions read as zero)."""
        x, taps = _f32(x), _f32(taps)
        if out is None:
            out = np.empty((int(out_hw[0]), int(out_hw[1]), x.shape[-1]), np.float32)
        self.module.depthwise_conv2d(x, taps, int(stride), int(top), int(left), out)
        return out

    def full_attention(self, q, k, v, scale: float, out: np.ndarray | None = None) -> np.ndarray:
        """q [n, H, hd], k/v [T, KV, hd] float32 -> [n, H*hd]: every query sees every key."""
        q, k, v = _f32(q), _f32(k), _f32(v)
        if q.ndim != 3:
            raise ValueError(f"full_attention: q must have shape (n, heads, head_dim), got {q.shape}")
        if out is None:
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
        self.module.full_attention(q, k, v, float(scale), out)
        return out

    def attention(self, q, k, v, q_pos, k_pos, window: int, scale: float, softcap: float | None = None,
                  out: np.ndarray | None = None, bf16: bool = False) -> np.ndarray:
        """q [n, H, hd], k/v [T, KV, hd] (float32, or both float16: an fp16 KV cache), q_pos [n],
        k_pos [T] (-1 = empty) -> [n, H*hd].
        Key t is visible to query i iff k_pos[t] >= 0 and 0 <= q_pos[i] - k_pos[t] < window
        (window 0 = unlimited). A query that sees no key gets zeros (numpy gives nan)."""
        q, k, v = _f32(q), np.asarray(k), np.asarray(v)
        if k.dtype == np.float16 and v.dtype == np.float16:  # an fp16 KV cache: read as is
            k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        else:
            k, v = _f32(k), _f32(v)
        q_pos, k_pos = _i64(q_pos), _i64(k_pos)
        if q.ndim != 3:
            raise ValueError(f"attention: q must have shape (n, heads, head_dim), got {q.shape}")
        if out is None:
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
        self.module.attention(q, k, v, q_pos, k_pos, int(window), float(scale), float(softcap or 0.0), out,
                              bf16=bool(bf16))
        return out

    def stream_read_gbs(self, nbytes: int = 256 << 20, threads: int | None = None, passes: int = 5) -> float:
        """Best-of-`passes` read bandwidth (GB/s) of `threads` threads summing an `nbytes` buffer."""
        th = self.get_threads() if threads is None else threads
        return float(self.module.stream_read_gbs(int(nbytes), int(th), int(passes)))

    def embed(self, ids, t: QTensor, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `ids` of W, dequantized: float32 [n, cols]. ids: 1-D integers (or a scalar)."""
        w, scale, rows, cols = _weight_parts(t)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"embed: ids must be integers, got {ids.dtype}")
        if ids.ndim == 0:
            ids = ids.reshape(1)
        if ids.ndim != 1:
            raise ValueError(f"embed: ids must be 1-D, got shape {ids.shape}")
        if ids.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            if ids.dtype.kind == "u" and ids.size and int(ids.max()) >= rows:
                bad = int(ids.max())
                pos = int(np.argmax(ids))
                raise ValueError(f"embed: id {bad} at position {pos} is out of range for {rows} rows")
            ids = ids.astype(np.int64)
        if not ids.flags.c_contiguous or not ids.flags.aligned:
            ids = np.ascontiguousarray(ids)
        if out is None:
            out = np.empty((ids.shape[0], cols), dtype=np.float32)
        self.module.embed(ids, t.scheme.id, w, scale, rows, cols, out)
        return out


def _f32(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.aligned:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def _i64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"positions must be integers, got {a.dtype}")
    if a.dtype != np.int64 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.int64)
    return a


def _qd8_mode(mode) -> int:
    if mode is None or mode == "auto" or mode == -1:
        return -1
    if isinstance(mode, str):
        mode = mode.strip().lower()
        if mode in ("auto", ""):
            return -1
        if mode in ("0", "off", "false", "no"):
            return 0
        if mode in ("1", "on", "true", "yes"):
            return 1
        raise ValueError(f"qd8 mode must be auto, 0 or 1, got {mode!r}")
    if mode is True or mode is False:
        return int(mode)
    if mode in (0, 1):
        return int(mode)
    raise ValueError(f"qd8 mode must be auto/None, 0/False or 1/True, got {mode!r}")


def _qd8_arg(qd8) -> int:
    return -1 if qd8 is None else _qd8_mode(bool(qd8))

def kernels(isa: str) -> Kernels:
    """The kernels of one ISA build; raises RuntimeError saying why when it can't be used here."""
    why = isa_unavailable_reason(isa)
    if why is not None:
        raise RuntimeError(f"native kernels for {isa}: {why}")
    return Kernels(isa, _MODULES[isa])


def _choose() -> tuple[Kernels | None, str | None]:
    if _SCALAR is None:
        return None, _LOAD_ERROR
    forced = os.environ.get("EDGELM_ISA", "").strip().lower()
    if forced:
        why = isa_unavailable_reason(forced)
        if why is None:
            return kernels(forced), None
        warnings.warn(f"EDGELM_ISA={forced} can't be used ({why}); picking the best available build",
                      RuntimeWarning, stacklevel=3)
    for isa in _machine_isas():
        if isa == "vnniemu":  # a test build, slower than avx2
            continue
        if isa_unavailable_reason(isa) is None:
            return kernels(isa), None
    return None, "no native kernel build is usable on this CPU"


_DEFAULT, _REASON = _choose()
ISA: str = _DEFAULT.isa if _DEFAULT is not None else "none"
_QD8_ENV_ERROR: str | None = None
if _DEFAULT is not None:
    try:
        _DEFAULT.set_threads(default_threads())
    except Exception:  # pragma: no cover - keep import from raising
        pass
    if os.environ.get("EDGELM_QD8", "").strip():
        try:
            _qd8_mode(os.environ["EDGELM_QD8"])
        except ValueError as e:
            _QD8_ENV_ERROR = str(e)
            warnings.warn(f"EDGELM_QD8 ignored: {e}", RuntimeWarning, stacklevel=2)


def available() -> bool:
    return _DEFAULT is not None


def unavailable_reason() -> str:
    return "" if _DEFAULT is not None else (_REASON or "unknown")


def _default() -> Kernels:
    if _DEFAULT is None:
        raise RuntimeError(f"native kernels are unavailable: {_REASON}")
    return _DEFAULT


def set_threads(n: int) -> None:
    """Threads (the caller included) the kernels use; n >= 1."""
    _default().set_threads(n)


def get_threads() -> int:
    return _default().get_threads()


def matmul(x: np.ndarray, t: QTensor, out: np.ndarray | None = None, qd8: bool | None = None) -> np.ndarray:
    """x [n, cols] (or [cols], or [..., cols]) float32 @ W.T -> [n, rows] float32."""
    return _default().matmul(x, t, out, qd8)


def embed(ids, t: QTensor) -> np.ndarray:
    """Dequantized rows `ids` of W: float32 [n, cols]; out-of-range ids raise ValueError."""
    return _default().embed(ids, t)


def set_qd8(mode) -> None:
    """Activation path of integer schemes: None/'auto', 0/False (fp32) or 1/True (qd8)."""
    _default().set_qd8(mode)


def get_qd8() -> int:
    """-1 auto, 0 off, 1 on."""
    return _default().get_qd8()


def uses_qd8(scheme_id: int, n: int = 1) -> bool:
    """Whether matmul takes the qd8 path for this scheme id and activation row count now."""
    return bool(_default().module.uses_qd8(int(scheme_id), int(n)))


def stream_read_gbs(nbytes: int = 256 << 20, threads: int | None = None, passes: int = 5) -> float:
    """STREAM-style read bandwidth probe (GB/s, best of `passes`); threads default = get_threads()."""
    return _default().stream_read_gbs(nbytes, threads, passes)
