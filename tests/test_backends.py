"""The backend interface (backends/base.py): every backend implements every op itself, a
missing op is an error, and capabilities (KV dtype, fused plans) come from the backend."""

import inspect

import numpy as np
import pytest

from edgelm.backends import cpu, native
from edgelm.backends.base import OPS, Backend
from edgelm.backends.host import HostBackend
from edgelm.backends.numpy_ops import NumpyOps
from edgelm.runtime.engine import Engine

from .tiny_bundle import tiny_bundle

BACKENDS = [NumpyOps] + ([cpu.CpuOps] if cpu.available() else [])


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.name)
def test_every_op_is_the_backends_own(cls):
    assert issubclass(cls, Backend) and not inspect.isabstract(cls)
    for op in OPS:
        # defined by the class itself or by HostBackend (the abstract base the host backends
        # share), never inherited from another concrete backend
        owner = next(k for k in cls.__mro__ if op in vars(k))
        assert owner is cls or owner is HostBackend, (cls.name, op, owner)
    assert cls.default_kv_dtype in ("f16", "f32")
    assert set(OPS) == set(Backend.__abstractmethods__)


def test_a_missing_op_is_an_error():
    class Partial(Backend):
        name = "partial"

        def matmul(self, x, t):
            return x

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_kv_dtype_and_fused_plans_come_from_the_backend():
    eng = Engine(tiny_bundle(), backend="numpy", max_tokens=64)
    assert eng.kv_dtype_name == NumpyOps.default_kv_dtype == "f32"
    assert eng.ops.fused_plans == frozenset()
    if cpu.available():
        c = Engine(tiny_bundle(), backend="cpu", max_tokens=64)
        assert c.kv_dtype_name == "f16" and "gemma3_blocks" in c.ops.fused_plans
        # the same tokens through the fused plan and through the numpy reference
        ids = c.tokenize("The river town kept its records")
        a = c.score(ids)
        b = Engine(tiny_bundle(), backend="numpy", max_tokens=64, kv_dtype="f16").score(ids)
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel < 1e-3


def test_attn_precision_option(tmp_path):
    """Engine(attn_precision=): auto by default (bf16 for int4 bundles, else f32), bf16 only
    where the backend has the path (never on numpy, never in deterministic mode), a bad value
    is a clear error."""
    from edgelm.convert import convert, load_source
    from edgelm.errors import BadInputError

    from . import hf_fixtures as fx

    assert Engine(tiny_bundle(), backend="numpy", max_tokens=64).attn_precision == "f32"
    assert Engine(tiny_bundle(), backend="numpy", max_tokens=64, attn_precision="bf16").attn_precision == "f32"
    with pytest.raises(BadInputError, match="attn_precision must be one of auto, f32, bf16, got 'fp8'"):
        Engine(tiny_bundle(), backend="numpy", max_tokens=64, attn_precision="fp8")
    if cpu.available():
        e = Engine(tiny_bundle(), backend="cpu", max_tokens=64, attn_precision="bf16", deterministic=True)
        assert e.attn_precision == "f32"  # batch-invariant kernels keep fp32 attention
    if native.cpu_supports("vnniemu"):  # the emulating build has the path on any x86-64 CPU
        src = load_source(fx.make_tiny_gemma3(tmp_path / "hf", seed=1, layers=2, sliding_window=8))
        for scheme, want in (("int4-b32", "bf16"), ("int8", "f32"), ("fp32", "f32")):
            convert(src, tmp_path / f"{scheme}.edgelm", scheme=scheme, progress=False)
            e = Engine(tmp_path / f"{scheme}.edgelm", backend=cpu.CpuOps("vnniemu"), max_tokens=64)
            assert e.attn_precision == want, scheme  # auto: bf16 for int4 bundles
            assert Engine(tmp_path / f"{scheme}.edgelm", backend=cpu.CpuOps("vnniemu"), max_tokens=64,
                          attn_precision="f32").attn_precision == "f32"


def test_models_declare_caches_and_the_backend_allocates_them():
    from edgelm.backends.kvcache import CacheSpec, KVCache

    eng = Engine(tiny_bundle(), backend="numpy", max_tokens=64, prefill_chunk=16)
    specs = eng.model.cache_specs(eng.config, eng.max_tokens, eng.prefill_chunk)
    cfg = eng.config
    assert len(specs) == cfg.num_layers
    for spec, kind in zip(specs, cfg.layer_types):
        if kind == "local":  # a ring: window - 1 earlier positions plus a whole chunk
            assert spec == CacheSpec(min(64, cfg.sliding_window - 1 + 16), cfg.num_kv_heads, cfg.head_dim,
                                     cfg.sliding_window)
        else:
            assert spec == CacheSpec(64, cfg.num_kv_heads, cfg.head_dim, None)

    made = []

    class Counting(NumpyOps):
        def alloc_cache(self, spec, dtype):
            made.append((spec, dtype))
            return super().alloc_cache(spec, dtype)

    eng = Engine(tiny_bundle(), backend=Counting(), max_tokens=64, prefill_chunk=16)  # a backend from outside
    assert eng.ops.name == "numpy" and not made
    s = eng.create_session({"temperature": 0.0})
    assert [m[0] for m in made] == specs and {m[1] for m in made} == {"float32"}
    assert all(isinstance(c, KVCache) and c.window == sp.window for c, sp in zip(s.caches, specs))
    out = [p for p in s.generate("hello", max_new_tokens=3) if isinstance(p, str)]
    assert s.n_tokens > 1 and out is not None


def test_an_engine_is_read_only_once_built():
    eng = Engine(tiny_bundle(), backend="numpy", max_tokens=64)
    for name, value in (("ops", NumpyOps()), ("weights", None), ("max_tokens", 8), ("new_attribute", 1)):
        with pytest.raises(AttributeError, match="cannot be changed once built"):
            setattr(eng, name, value)
    assert eng.max_tokens == 64 and not hasattr(eng, "new_attribute")
