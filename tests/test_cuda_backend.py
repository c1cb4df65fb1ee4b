"""The CUDA backend (backends/cuda.py, backends/cuda_kernels.py) against the numpy reference.

Without a GPU (CI) every Triton kernel runs in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1); benchmarks/gpu_check.sh runs this file on a GPU with
TRITON_INTERPRET=0. Shapes stay small: the interpreter's cost is per program instance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from edgelm.backends.numpy_ops import NumpyOps  # noqa: E402
from edgelm.errors import BadInputError, CapacityError  # noqa: E402
from edgelm.quant.schemes import SCHEMES, quantize  # noqa: E402
from edgelm.runtime.engine import Engine  # noqa: E402

from .tiny_bundle import tiny_bundle  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

ON_GPU = os.environ.get("TRITON_INTERPRET") != "1"


@pytest.fixture(scope="module")
def ops():
    from edgelm.backends.cuda import CudaOps

    return CudaOps()


REF = NumpyOps()


def _f(rng, *s):
    return rng.standard_normal(s).astype(np.float32)


def _close(got, want, tol):
    # fp32 in and out; on a GPU tl.dot rounds its operands to TF32 (10-bit mantissa)
    tol = max(tol, 2e-3) if ON_GPU else tol
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


# ----------------------------------------------------------------------------- products

@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_quantized_matmul_equals_the_reference_dequantization(ops, scheme, rows):
    """Each scheme's weights, read in their stored layout and dequantized in registers, give
    the product with the reference's dequantized weights: the GEMV path (1-4 rows) and the
    tensor-core path (5+ rows, padded to 16), with a row count that is no tile multiple."""
    rng = np.random.default_rng(rows)
    w = quantize(_f(rng, 72, 256) * 0.1, scheme)  # 72 output rows: a partial tile
    x = _f(rng, rows, 256)
    _close(ops.to_host(ops.matmul(x, w)), REF.matmul(x, w), 2e-5)


@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4-b32"])
def test_fused_geglu_product(ops, scheme):
    rng = np.random.default_rng(1)
    g, u = quantize(_f(rng, 40, 64) * 0.2, scheme), quantize(_f(rng, 40, 64) * 0.2, scheme)
    for n in (1, 9):
        x = _f(rng, n, 64)
        _close(ops.to_host(ops.matmul_gelu_mul(x, g, u)), REF.matmul_gelu_mul(x, g, u), 5e-5)


def test_matmul_keeps_leading_axes_and_odd_widths(ops):
    """fp32 weights of any width (the towers' products), inputs with extra leading axes."""
    rng = np.random.default_rng(2)
    w = quantize(_f(rng, 33, 45), "fp32")
    x = _f(rng, 2, 3, 45)
    got = ops.to_host(ops.matmul(x, w))
    assert got.shape == (2, 3, 33)
    _close(got, REF.matmul(x.reshape(6, 45), w).reshape(2, 3, 33), 2e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_embedding_rows_are_dequantized_exactly(ops, scheme):
    rng = np.random.default_rng(3)
    w = quantize(_f(rng, 50, 256), scheme)
    ids = np.array([0, 49, 7, 7, 23], np.int32)
    np.testing.assert_array_equal(ops.to_host(ops.embed(ids, w)), REF.embed(ids, w))


def test_weights_stay_in_their_stored_layout_on_the_device(ops):
    """No float copy is made: the device holds the packed nibbles and fp16 scales."""
    rng = np.random.default_rng(4)
    t = quantize(_f(rng, 64, 128), "int4-b32")
    dw = ops._weight(t)
    assert dw.q.dtype == torch.uint8 and tuple(dw.q.shape) == (64, 64)
    assert dw.s.dtype == torch.float16 and tuple(dw.s.shape) == (64, 4)
    assert dw.nbytes == t.nbytes
    assert ops._weight(t) is dw  # uploaded once


def test_every_kernel_config_compiles_for_hopper_within_its_resources():
    """The real compiler, not the interpreter: Triton compiles each kernel and each autotuning
    config for sm_90 (H100/H200) with its own ptxas, no GPU needed. None may fail or stage
    more shared memory than an H100 block can have (227 KiB: a config over it would fail at
    launch on the device), and every specialization has a config that spills no registers
    (the autotuner may still pick a spilling one where the device measures it faster)."""
    import json
    import re

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/cuda_aot.py", "--json", "--sample"], capture_output=True,
                       text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode in (0, 1), r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) > 60
    bad = [x for x in rows if "error" in x or x["shared"] > 227 * 1024]
    assert not bad, bad
    groups: dict = {}
    for x in rows:  # the specialization: the label without its tile config
        key = re.sub(r" s\d$", "", re.sub(r" (BN\d+|BK\d+|w\d+)(?= |$)", "", x["kernel"]))
        groups.setdefault(key, []).append(not x["local"] and not x["stack"])
    assert all(any(v) for v in groups.values()), [k for k, v in groups.items() if not any(v)]
    assert {x["kernel"].split()[0] for x in rows} == {"qmm", "embed", "rmsnorm", "rope", "gelu_mul", "attn",
                                                       "attn_combine", "kv_write"}


# ----------------------------------------------------------------------------- fused elementwise

def test_norms_rope_and_geglu(ops):
    rng = np.random.default_rng(5)
    x, h, w, w2 = _f(rng, 5, 96), _f(rng, 5, 96), _f(rng, 96), _f(rng, 96)
    _close(ops.to_host(ops.rmsnorm(x, w, 1e-6)), REF.rmsnorm(x, w, 1e-6), 1e-6)
    a, b = ops.add_rmsnorm(x, h, w, 1e-6, w2)
    ra, rb = REF.add_rmsnorm(x, h, w, 1e-6, w2)
    _close(ops.to_host(a), ra, 1e-6)
    _close(ops.to_host(b), rb, 1e-6)
    a, none = ops.add_rmsnorm(x, h, w, 1e-6)
    assert none is None
    _close(ops.to_host(a), ra, 1e-6)
    # rows of 3-D inputs (Gemma 3n's per-layer inputs) and a width that is no power of two
    x3 = _f(rng, 2, 3, 40)
    _close(ops.to_host(ops.rmsnorm(x3, w[:40], 1e-5)), REF.rmsnorm(x3, w[:40], 1e-5), 1e-6)
    q = _f(rng, 4, 3, 32)
    pos = np.arange(4090, 4094, dtype=np.int64)  # large angles: the same fp32 rounding as the reference
    _close(ops.to_host(ops.rope(q, pos, 1e6, 8.0)), REF.rope(q, pos, 1e6, 8.0), 1e-5)
    wn = _f(rng, 32)
    _close(ops.to_host(ops.rmsnorm_rope(q, wn, 1e-6, pos, 1e4)), REF.rmsnorm_rope(q, wn, 1e-6, pos, 1e4), 1e-5)
    g, u = _f(rng, 3, 1000) * 3, _f(rng, 3, 1000)
    _close(ops.to_host(ops.gelu_mul(g, u)), REF.gelu_mul(g, u), 1e-6)


def test_generic_array_ops(ops):
    rng = np.random.default_rng(6)
    x, r = _f(rng, 3, 5, 64), _f(rng, 5, 64)
    _close(ops.to_host(ops.match_rms(x, r)), REF.match_rms(x, r), 1e-6)
    _close(ops.to_host(ops.gaussian_topk(r, 1.6448536)), REF.gaussian_topk(r, 1.6448536), 1e-6)
    _close(ops.to_host(ops.softcap(r * 40, 30.0)), REF.softcap(r * 40, 30.0), 1e-6)
    c, hs = _f(rng, 5, 4, 4), _f(rng, 4, 5, 64)
    _close(ops.to_host(ops.einsum("nqk,knd->qnd", c, hs)), REF.einsum("nqk,knd->qnd", c, hs), 1e-5)
    _close(ops.to_host(ops.concat([x[:1], x[1:] * 2], axis=0)), REF.concat([x[:1], x[1:] * 2], axis=0), 0)
    _close(ops.to_host(ops.tanh(r)), REF.tanh(r), 1e-6)
    rows, vals = np.array([1, 3]), _f(rng, 2, 64)
    np.testing.assert_array_equal(ops.to_host(ops.splice(ops._dev(r.copy()), rows, vals)),
                                  REF.splice(r.copy(), rows, vals))
    for k, s, top, left, hw in ((3, 2, 1, 1, (4, 5)), (3, 1, 1, 1, (7, 9)), (5, 1, 2, 2, (7, 9)), (3, 2, 0, 0, (3, 4))):
        xx, taps = _f(rng, 7, 9, 12), _f(rng, k, k, 12)
        _close(ops.to_host(ops.depthwise_conv2d(xx, taps, s, top, left, hw)),
               REF.depthwise_conv2d(xx, taps, s, top, left, hw), 1e-5)


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("case", [
    # n, H, KV, hd, T, window, softcap, kv dtype, splits
    (5, 4, 2, 16, 9, 4, 50.0, np.float32, None),  # GQA, sliding window, soft-cap
    (1, 4, 1, 256, 300, 0, None, np.float16, None),  # decode over an fp16 cache, head_dim 256
    (1, 4, 1, 256, 300, 0, None, np.float16, 3),  # ... split over three key spans (split-K)
    (37, 4, 2, 32, 70, 16, None, np.float16, None),  # a prefill chunk: several query tiles
    (2, 4, 4, 64, 700, 0, None, np.float32, 5),  # spans that end past the keys
])
def test_attention_matches_the_reference(ops, case):
    n, H, KV, hd, T, window, softcap, dt, splits = case
    rng = np.random.default_rng(T)
    q, k, v = _f(rng, n, H, hd), _f(rng, T, KV, hd).astype(dt), _f(rng, T, KV, hd).astype(dt)
    kpos = np.arange(T, dtype=np.int64)
    kpos[3] = -1  # an empty slot
    qpos = np.arange(T - n, T, dtype=np.int64)
    want = REF.attention(q, k, v, qpos, kpos, window, 0.25, softcap)
    K = ops.K
    got = K.attention(ops._dev(q), ops._upload(k), ops._upload(v), ops._upload_i64(qpos), ops._upload_i64(kpos),
                      window, 0.25, softcap, splits=splits)
    # an fp16 cache's dot products take fp16 operands (q and the softmax weights rounded to
    # fp16, 2^-11 relative), as GPU flash attention does; an fp32 cache's are fp32 (TF32 on a GPU)
    tol = 4e-3 if dt == np.float16 else 2e-5
    _close(ops.to_host(got), want, tol)
    # a device length bounds the keys read: slots past it are never visible
    cut = T // 2
    ln = ops._upload(np.array([cut], np.int32))
    kp2 = kpos.copy()
    kp2[cut:] = -1
    qp = np.array([cut + 1], np.int64)  # would see slots cut.. if they were read
    got = K.attention(ops._dev(q[:1]), ops._upload(k), ops._upload(v), ops._upload_i64(qp), ops._upload_i64(kpos),
                      window, 0.25, softcap, kv_len=ln, splits=splits)
    _close(ops.to_host(got), REF.attention(q[:1], k, v, qp, kp2, window, 0.25, softcap), tol)


# ----------------------------------------------------------------------------- whole models

def test_gemma3_on_the_cuda_backend_matches_the_reference():
    """The tiny Gemma 3 (a sliding window of 8: the rings wrap) on the cuda backend: every
    position's logits, and greedy generation with the static decode step and the device
    argmax, token for token the reference's."""
    b = tiny_bundle()
    ref = Engine(b, backend="numpy", max_tokens=96, prefill_chunk=16)
    eng = Engine(b, backend="cuda", max_tokens=96, prefill_chunk=16, kv_dtype="f32")
    assert eng.backend == "cuda"
    rng = np.random.default_rng(5)
    ids = [int(i) for i in rng.integers(4, ref.config.vocab_size, size=40)]
    _close(eng.score(ids), ref.score(ids), 2e-5)

    seen = []
    real_to_host = eng.ops.to_host

    def to_host(x):
        seen.append(tuple(x.shape))
        return real_to_host(x)

    object.__setattr__(eng.ops, "to_host", to_host)
    outs = []
    for e in (ref, eng):
        s = e.create_session({"temperature": 0.0})
        list(s.generate("a river town", max_new_tokens=10))
        list(s.generate("and then", max_new_tokens=5))  # a second turn on the same cache
        outs.append(list(s.tokens))
    assert outs[0] == outs[1]
    assert seen == []  # greedy decoding copied no logits to the host
    g = s.caches[0].graph
    assert g is not None and g.steps >= 13  # the decode steps went through the static step


def test_static_decode_step_equals_the_per_op_forward(ops):
    """The static step (device token/position buffers, cache slots and filled length written
    on the device, attention bounded by that length) is what a CUDA graph captures: its logits
    equal the ordinary forward's at every step, also after a rewind."""
    b = tiny_bundle()
    eng = Engine(b, backend=ops, max_tokens=40, prefill_chunk=8, kv_dtype="f32")
    m, cfg, w = eng.model, eng.config, eng.weights
    a, s = eng.create_session(), eng.create_session()
    prompt = [2, 11, 12, 13, 14, 15]
    a.prefill(prompt)
    s.prefill(prompt)
    toks = [17, 21, 5, 9, 30, 31, 32, 33, 34, 35, 36, 37]  # past the window of 8: the rings wrap
    for i, t in enumerate(toks):
        if i == 8:
            for x in (a, s):
                assert x.rewind(len(prompt) + 5)
        n0 = len(a.tokens)
        want = ops.to_host(m.forward(cfg, w, ops, np.array([t], np.int32), n0, a.caches, "last"))
        a.tokens.append(t)
        got = ops.to_host(ops.decode_step(m, cfg, w, s.caches, t, n0))
        s.tokens.append(t)
        _close(got, want, 1e-6)
        for ca, cs in zip(a.caches, s.caches):
            np.testing.assert_array_equal(ca.pos, cs.pos)
            assert ca.filled == cs.filled == int(cs.dlen.item())
            np.testing.assert_array_equal(ops.to_host(cs.dpos).astype(np.int64), cs.pos)


@pytest.fixture(scope="module")
def gemma3n_bundle(tmp_path_factory):
    pytest.importorskip("transformers")
    import gemma3n_fixtures as g3n

    return g3n.tiny_text_bundle(tmp_path_factory.mktemp("cuda-g3n"), "int8")


def test_gemma3n_on_the_cuda_backend_matches_the_reference(gemma3n_bundle):
    """Gemma 3n text (AltUp, Laurel, per-layer inputs, KV sharing, activation sparsity) through
    the same model file. Its per-layer embedding table stays in the mmap (host-gathered)."""
    ref = Engine(gemma3n_bundle, backend="numpy", max_tokens=64, prefill_chunk=16)
    eng = Engine(gemma3n_bundle, backend="cuda", max_tokens=64, prefill_chunk=16, kv_dtype="f32")
    assert not isinstance(eng.weights.ple, torch.Tensor) and type(eng.weights.ple).__name__ == "QTensor"
    ids = [int(i) for i in np.random.default_rng(2).integers(4, ref.config.vocab_size, size=20)]
    _close(eng.score(ids), ref.score(ids), 1e-4)
    outs = []
    for e in (ref, eng):
        s = e.create_session({"temperature": 0.0})
        list(s.generate("a river", max_new_tokens=4))
        outs.append(list(s.tokens))
    assert outs[0] == outs[1]


def test_top_k_sampling_copies_only_the_candidates():
    """A top-k sample on the cuda backend brings k candidates to the host, not the row: each
    token is among the reference's top k, and a seed gives the same tokens again."""
    b = tiny_bundle()
    eng = Engine(b, backend="cuda", max_tokens=64, kv_dtype="f32")
    ref = Engine(b, backend="numpy", max_tokens=64)
    big = []
    real_to_host = eng.ops.to_host
    object.__setattr__(eng.ops, "to_host", lambda x: (big.append(x.shape) if x.numel() > 64 else None,
                                                       real_to_host(x))[1])
    runs = []
    for _ in range(2):
        s = eng.create_session({"temperature": 0.9, "top_k": 5, "top_p": 0.9, "seed": 11})
        list(s.generate("a river town", max_new_tokens=8))
        runs.append((list(s.tokens), list(s.generated_ids)))
    assert runs[0] == runs[1] and big == []
    held, gen = runs[0]
    seq = held[:len(held) - len(gen) + 1] + gen  # the prompt, then every sampled token
    r = ref.create_session()
    n = ref.tokenizer.vocab_size  # rows past the tokenizer's vocabulary (padding) are never sampled
    for i in range(len(seq) - len(gen), len(seq)):  # each sampled token is in the reference's top 5
        logits = r.prefill(seq[len(r.tokens):i])[:n]
        assert seq[i] in np.argsort(logits)[-5:]


def test_sampling_and_logprobs_on_the_cuda_backend():
    """Non-greedy sampling and logprobs bring the row to the host: the same seed samples the
    same tokens as the reference."""
    b = tiny_bundle()
    ref = Engine(b, backend="numpy", max_tokens=64)
    eng = Engine(b, backend="cuda", max_tokens=64, kv_dtype="f32")
    outs = []
    for e in (ref, eng):
        s = e.create_session({"temperature": 0.8, "top_k": 20, "seed": 3})
        list(s.generate("a river town", max_new_tokens=6, logprobs=2))
        outs.append((list(s.tokens), [t.token for t in s.generated_logprobs]))
    assert outs[0] == outs[1]


def test_batched_decode_on_the_cuda_backend():
    """The server's batched decode step (each weight read once for all rows, attention per
    sequence over its own device cache) gives the reference's logits."""
    b = tiny_bundle()
    rows = []
    for backend in ("numpy", "cuda"):
        eng = Engine(b, backend=backend, max_tokens=48, kv_dtype="f32")
        ss = [eng.create_session() for _ in range(3)]
        for i, s in enumerate(ss):
            s.prefill([2] + list(range(10 + i, 14 + 3 * i)))  # three different lengths
        rows.append(np.stack([eng.decode_batch(ss, [20, 21, 22]), eng.decode_batch(ss, [5, 6, 7])]))
    _close(rows[1], rows[0], 2e-5)


def test_bench_and_run_on_the_cuda_backend():
    """`edgelm bench --backend cuda` and `edgelm run --backend cuda` (the interpreter here: no
    GPU memory column, which only a device has)."""
    from edgelm.bench import bench, format_table

    res = bench(tiny_bundle(), prompt_tokens=8, gen_tokens=3, repeat=1, max_tokens=32, backend="cuda",
                progress=False)
    assert res["backend"] == "cuda" and res["metrics"]["decode_tok_s"]["median"] > 0
    table = format_table(res)
    assert ("peak GPU memory MiB" in table) == ON_GPU and "cuda (" in table and "threads" not in table.split("\n")[1]
    r = _cli("run", "--model", str(tiny_bundle()), "--backend", "cuda", "-n", "3", "--temperature", "0", "a river",
             env={} if ON_GPU else {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    assert "cuda/" in r.stderr


def test_importance_recording_sees_the_cuda_products():
    """`edgelm imatrix --backend cuda`: the recorder finds the bundle's tensors behind the
    placed device weights, and records what the reference records."""
    from edgelm.runtime import imatrix as im

    b = tiny_bundle()
    seqs = [[2, 11, 12, 13, 14, 15, 16]]
    want = im.collect(Engine(b, backend="numpy", max_tokens=32), seqs)
    got = im.collect(Engine(b, backend="cuda", max_tokens=32, kv_dtype="f32"), seqs)
    assert set(got) == set(want) and len(want) > 3
    for k in want:
        if k != im.META_KEY:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-3)


# ----------------------------------------------------------------------------- errors

def test_out_of_memory_is_a_clear_error_and_the_engine_stays_usable(monkeypatch):
    b = tiny_bundle()
    eng = Engine(b, backend="cuda", max_tokens=64)
    real = torch.zeros

    def zeros(*a, **kw):
        shape = a[0] if a else kw.get("size")
        if isinstance(shape, tuple) and len(shape) == 3 and shape[0] > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.raises(CapacityError, match=r"CUDA out of memory allocating a KV cache: .* MiB requested"):
        eng.create_session()
    monkeypatch.undo()
    s = eng.create_session()  # a later request that fits works
    assert "".join(p for p in s.generate("a river", max_new_tokens=3) if isinstance(p, str)) is not None


def test_out_of_memory_in_a_forward_leaves_the_session_as_it_was(monkeypatch):
    b = tiny_bundle()
    eng = Engine(b, backend="cuda", max_tokens=64, prefill_chunk=32)
    s = eng.create_session({"temperature": 0.0})
    s.prefill([2, 11, 12])
    real = eng.ops.matmul

    def matmul(x, t):
        if x.shape[0] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(x, t)

    monkeypatch.setattr(eng.ops, "matmul", matmul)
    with pytest.raises(CapacityError, match=r"out of device memory running a 20-token step .* session is unchanged"):
        s.prefill(list(range(30, 50)))
    assert s.tokens == [2, 11, 12] and all(c.filled <= 3 for c in s.caches)
    s.prefill([13, 14])  # smaller steps still run, on the same cache
    monkeypatch.undo()
    ref = Engine(b, backend="numpy", max_tokens=64)
    _close(s.decode_step(15), ref.create_session().prefill([2, 11, 12, 13, 14, 15]), 4e-3)


def _cli(*args, env):
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True, env=e, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])


@pytest.mark.skipif(ON_GPU, reason="checks the message where there is no GPU")
def test_backend_cuda_without_a_gpu_is_one_clear_line(tmp_path):
    r = _cli("run", "--model", str(tiny_bundle()), "--backend", "cuda", "-n", "2", "hello", env={})
    assert r.returncode == 2, r.stderr
    assert "no CUDA GPU is visible" in r.stderr and "Traceback" not in r.stderr
    # auto falls back to the cpu backend
    r = _cli("run", "--model", str(tiny_bundle()), "--backend", "auto", "-n", "2", "hello", env={})
    assert r.returncode == 0, r.stderr


def test_backend_cuda_without_the_extra_names_it(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "triton.py").write_text("raise ImportError('No module named triton')\n")
    r = _cli("run", "--model", str(tiny_bundle()), "--backend", "cuda", "-n", "2", "hello",
             env={"PYTHONPATH": str(shim)})
    assert r.returncode == 2, r.stderr
    assert "edgelm[cuda]" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BadInputError, match="unknown backend"):
        Engine(tiny_bundle(), backend="tpu")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_auto_picks_cuda_on_a_gpu():
    assert Engine(tiny_bundle(), backend="auto").backend == "cuda"


def test_the_cpu_backend_never_imports_torch_or_triton():
    """Neither `--backend cpu` nor, on a machine without an NVIDIA driver, `--backend auto`."""
    backend = "cpu" if ON_GPU else "auto"
    code = ("import sys; from edgelm.runtime.engine import Engine; e = Engine(sys.argv[1], backend=sys.argv[2]);"
            "s = e.create_session(); list(s.generate('a river', max_new_tokens=2));"
            "bad = {'torch', 'triton'} & set(sys.modules); sys.exit(3 if bad or e.backend != 'cpu' else 0)")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_bundle()), backend], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
