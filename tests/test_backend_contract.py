"""The backend contract (backends/base.py): every backend x every op x every model.

`OpaqueOps` is a backend whose arrays allow only the array contract (arithmetic, basic
indexing, reshape, shape): numpy functions, ufuncs, methods such as `.mean` or `.astype`,
in-place writes and host arrays passed where a backend array belongs all raise. Each model
runs on it and must give bitwise the numpy reference's results (it wraps the very same
ops), so a model file that steps outside the op table fails here, as a device backend would.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm.backends import cpu
from edgelm.backends.base import OPS, Backend
from edgelm.backends.numpy_ops import NumpyOps
from edgelm.quant.schemes import QTensor, quantize
from edgelm.runtime.content import Embeddings, Text
from edgelm.runtime.engine import Engine

from .tiny_bundle import tiny_bundle

sys.path.insert(0, str(Path(__file__).parent))


class ContractError(TypeError):
    pass


_SCALARS = (int, float, np.floating, np.integer)


class Opaque:
    """A device array stand-in: the contract's operators and nothing else."""

    __slots__ = ("a",)
    __array_ufunc__ = None  # ufuncs (np.tanh(x), ndarray + x) refuse it; binops defer to us

    def __init__(self, a: np.ndarray):
        assert isinstance(a, np.ndarray)
        self.a = a

    def __array__(self, *args, **kwargs):
        raise ContractError("a backend array was handed to numpy: use an op")

    def __array_function__(self, func, types, args, kwargs):
        raise ContractError(f"np.{func.__name__} on a backend array: use an op")

    def __bool__(self):
        raise ContractError("truth value of a backend array")

    def __iter__(self):
        raise ContractError("iterating a backend array")

    @staticmethod
    def _v(o):
        if isinstance(o, Opaque):
            return o.a
        if isinstance(o, _SCALARS) and not isinstance(o, bool):
            return o
        raise ContractError(f"arithmetic between a backend array and {type(o).__name__}")

    def __add__(self, o): return Opaque(self.a + self._v(o))
    def __radd__(self, o): return Opaque(self._v(o) + self.a)
    def __sub__(self, o): return Opaque(self.a - self._v(o))
    def __rsub__(self, o): return Opaque(self._v(o) - self.a)
    def __mul__(self, o): return Opaque(self.a * self._v(o))
    def __rmul__(self, o): return Opaque(self._v(o) * self.a)
    def __truediv__(self, o): return Opaque(self.a / self._v(o))
    def __rtruediv__(self, o): return Opaque(self._v(o) / self.a)
    def __neg__(self): return Opaque(-self.a)

    def __getitem__(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if not (i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice))):
                raise ContractError(f"advanced indexing of a backend array with {type(i).__name__}")
        return Opaque(self.a[idx])

    def reshape(self, *shape):
        return Opaque(self.a.reshape(*shape))

    @property
    def shape(self):
        return self.a.shape


# which arguments of each op are host metadata (numpy); every other array must be the backend's
_HOST_ARGS = {"embed": {"ids"}, "rope": {"positions"}, "rmsnorm_rope": {"positions"},
              "attention": {"q_pos", "k_pos"}, "splice": {"rows", "values"}}
_COMPUTE = [op for op in OPS if op not in ("place_weights", "alloc_cache", "to_host")]


def _unwrap(op: str, arg: str, v):
    if isinstance(v, Opaque):
        return v.a
    if isinstance(v, np.ndarray) and arg not in _HOST_ARGS.get(op, ()):
        raise ContractError(f"ops.{op}: argument {arg!r} is a host array, not a backend array")
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(op, arg, x) for x in v)
    return v


def _wrap(v):
    if isinstance(v, np.ndarray):
        return Opaque(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_wrap(x) for x in v)
    return v


class _OpaqueCache:
    """The host KV cache behind the contract: K/V go in and come out as backend arrays."""

    def __init__(self, inner):
        self._c = inner

    def update(self, k, v, positions):
        if not (isinstance(k, Opaque) and isinstance(v, Opaque)):
            raise ContractError("cache.update takes backend arrays")
        K, V, kpos = self._c.update(k.a, v.a, positions)
        return Opaque(K), Opaque(V), kpos

    def copy(self):
        return _OpaqueCache(self._c.copy())

    def __getattr__(self, a):
        return getattr(self._c, a)


def _make_op(op: str):
    sig = inspect.signature(getattr(Backend, op))

    def method(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        call = []  # in signature order (no op has keyword-only parameters)
        for k, v in list(bound.arguments.items())[1:]:
            if sig.parameters[k].kind is inspect.Parameter.VAR_POSITIONAL:
                call += [_unwrap(op, k, x) for x in v]
            else:
                call.append(_unwrap(op, k, v))
        return _wrap(getattr(self._ref, op)(*call))

    method.__name__ = op
    return method


def _place(x):
    if isinstance(x, np.ndarray):
        return Opaque(x)
    if isinstance(x, QTensor) or x is None:
        return x
    if isinstance(x, tuple):
        return tuple(_place(v) for v in x)
    if dataclasses.is_dataclass(x):
        return type(x)(**{f.name: _place(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def _to_host(self, x):
    if not isinstance(x, Opaque):
        raise ContractError(f"to_host of a {type(x).__name__}")
    return x.a


def _opaque_ops_class():
    ns = {op: _make_op(op) for op in _COMPUTE}
    ns.update(
        name="opaque",
        default_kv_dtype="f32",
        __init__=lambda self: setattr(self, "_ref", NumpyOps()),
        place_weights=lambda self, w: _place(w),
        alloc_cache=lambda self, spec, dtype: _OpaqueCache(self._ref.alloc_cache(spec, dtype)),
        to_host=_to_host,
    )
    return type("OpaqueOps", (Backend,), ns)


OpaqueOps = _opaque_ops_class()


def test_the_opaque_array_refuses_what_the_contract_does_not_allow():
    x = Opaque(np.ones((2, 3), np.float32))
    (x + 1.0) * np.float32(2.0) - x / x
    x[None, :, 1:]
    x.reshape(3, 2)
    for bad in (lambda: np.tanh(x), lambda: np.concatenate([x, x]), lambda: np.asarray(x), lambda: x.mean(),
                lambda: x.astype(np.float32), lambda: x + np.ones(3, np.float32), lambda: x[np.array([0])],
                lambda: bool(x)):
        with pytest.raises((ContractError, AttributeError, TypeError)):
            bad()


def test_the_contract_backend_is_complete():
    assert not inspect.isabstract(OpaqueOps)
    assert set(OPS) == set(Backend.__abstractmethods__)


# ----------------------------------------------------------------------------- every op

def _qt(rows, cols, rng, scheme="fp32"):
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    return quantize(w, scheme)


def _cases(rng):
    """One example call per compute op: (args, kwargs); arrays are backend arrays except
    the host arguments named in _HOST_ARGS."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    n, d, H, KV, hd, T = 5, 64, 4, 2, 16, 9
    w1, w2 = _qt(48, d, rng, "int8"), _qt(48, d, rng, "int4-b32")
    pos = np.arange(3, 3 + n, dtype=np.int64)
    kpos = np.arange(T, dtype=np.int64)
    kpos[-1] = -1
    return {
        "matmul": ((f(n, d), w1), {}),
        "matmul_multi": ((f(n, d), (w1, w2)), {}),
        "matmul_gelu_mul": ((f(n, d), w1, w2), {}),
        "embed": ((np.array([0, 7, 47, 7], np.int32), w1), {}),
        "rmsnorm": ((f(n, d), f(d), 1e-6), {"act": "gelu"}),  # (models call it plain everywhere)
        "add_rmsnorm": ((f(n, d), f(n, d), f(d), 1e-6, f(d)), {}),
        "rmsnorm_rope": ((f(n, H, hd), f(hd), 1e-6, pos, 10_000.0), {}),
        "rope": ((f(n, H, hd), pos, 1e6, 8.0), {}),
        "gelu_mul": ((f(n, d), f(n, d)), {}),
        "sigmoid_mul": ((f(n, d), f(n, d) * 4), {}),
        "full_attention": ((f(n, H, hd), f(T, KV, hd), f(T, KV, hd), 0.25), {}),
        "attention": ((f(n, H, hd), f(T, KV, hd), f(T, KV, hd), pos, kpos, 4, 0.25, 50.0), {}),
        "softcap": ((f(n, d) * 40, 30.0), {}),
        "tanh": ((f(n, d),), {}),
        "einsum": (("nqk,knd->qnd", f(n, 4, 4), f(4, n, d)), {}),
        "concat": (([f(1, n, d), f(3, n, d)],), {"axis": 0}),
        "match_rms": ((f(3, n, d), f(n, d)), {}),
        "gaussian_topk": ((f(n, d), 1.6448536), {}),
        "splice": ((f(n, d), np.array([1, 3], np.int64), f(2, d)), {}),
        # stride 2 and padding on both sides: taps past the bottom and right edges read zero
        "depthwise_conv2d": ((f(7, 9, 20), f(3, 3, 20), 2, 1, 1, (4, 5)), {}),
    }


def _backends():
    out = [("opaque", OpaqueOps)]
    if cpu.available():
        out.append(("cpu", cpu.CpuOps))
    try:  # the cuda backend, in Triton's interpreter where there is no GPU (conftest)
        from edgelm.backends import cuda

        if cuda.unavailable_reason() is None:
            out.append(("cuda", cuda.CudaOps))
    except ImportError:
        pass
    return out


def _as_backend(op, args, kwargs, wrap):
    params = list(inspect.signature(getattr(Backend, op)).parameters.values())[1:]
    names = [p.name for p in params]
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        names += [params[-1].name] * (len(args) - len(names))

    def conv(name, v):
        if not wrap or name in _HOST_ARGS.get(op, ()):
            return v.copy() if isinstance(v, np.ndarray) else v
        if isinstance(v, np.ndarray):
            return Opaque(v.copy())
        if isinstance(v, list):
            return [conv(name, x) for x in v]
        return v

    return [conv(n, v) for n, v in zip(names, args)], {k: conv(k, v) for k, v in kwargs.items()}


def _host(ops, v):
    if isinstance(v, (list, tuple)):
        return [_host(ops, x) for x in v if x is not None]
    return np.asarray(ops.to_host(v))


def test_every_compute_op_has_a_case():
    assert set(_cases(np.random.default_rng(0))) == set(_COMPUTE)


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b[0])
@pytest.mark.parametrize("op", _COMPUTE)
def test_every_op_matches_the_reference(backend, op):
    name, cls = backend
    args, kwargs = _cases(np.random.default_rng(7))[op]
    ref = NumpyOps()
    want = _host(ref, getattr(ref, op)(*_as_backend(op, args, kwargs, False)[0], **kwargs))
    ops = cls()
    a, kw = _as_backend(op, args, kwargs, name == "opaque")
    got = _host(ops, getattr(ops, op)(*a, **kw))
    assert len(got) == len(want) if isinstance(want, list) else got.shape == want.shape
    for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
        assert g.shape == w.shape and g.dtype == np.float32, (op, g.shape, w.shape, g.dtype)
        if name == "opaque":
            np.testing.assert_array_equal(g, w)  # the same numpy math underneath
        else:  # native/device kernels: their own summation order and, on cpu, int8 activations
            tol = 0.05 if op in ("matmul", "matmul_multi", "matmul_gelu_mul") else 2e-5
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol * max(1.0, float(np.abs(w).max())))


# ----------------------------------------------------------------------------- every model

@pytest.fixture(scope="module")
def gemma3n_bundle(tmp_path_factory):
    pytest.importorskip("transformers")
    import gemma3n_fixtures as g3n

    return g3n.tiny_text_bundle(tmp_path_factory.mktemp("contract-g3n"), "fp32")


@pytest.fixture(params=["gemma3", "gemma3n"])
def model_bundle(request):
    return tiny_bundle() if request.param == "gemma3" else request.getfixturevalue("gemma3n_bundle")


def test_every_model_runs_on_the_contract_backend(model_bundle):
    ref = Engine(model_bundle, backend="numpy", max_tokens=96, prefill_chunk=16)
    eng = Engine(model_bundle, backend=OpaqueOps(), max_tokens=96, prefill_chunk=16)
    assert eng.backend == "opaque" and eng.kv_dtype_name == "f32"
    assert any(isinstance(v, Opaque) for v in dataclasses.astuple(eng.weights.layers[0]))  # norms were placed
    rng = np.random.default_rng(5)
    ids = [int(i) for i in rng.integers(4, ref.config.vocab_size, size=40)]
    # teacher-forced logits over several chunks (sliding rings wrap), each row and the head
    np.testing.assert_array_equal(eng.score(ids), ref.score(ids))
    np.testing.assert_array_equal(eng.score(ids, start=33), ref.score(ids, start=33))

    # generation with soft embedding rows spliced in, then a second turn on the same cache
    soft = rng.standard_normal((3, ref.config.hidden_size)).astype(np.float32)
    parts = [Text("a river"), Embeddings(soft, token_id=7), Text("town")]
    outs = []
    for e in (ref, eng):
        s = e.create_session({"temperature": 0.0})
        list(s.generate(parts, max_new_tokens=6))
        first = list(s.tokens)
        list(s.generate("and then", max_new_tokens=4))
        outs.append((first, list(s.tokens)))
    assert outs[0] == outs[1]
