"""The fused Gemma 3 block path (edgelm/_native/block.h, CpuOps.gemma3_blocks): every forward
step (prefill chunks and decode steps) runs all blocks in one native call. It must be bitwise the per-op loop of
models/gemma3.forward (same kernels, same order), write the KV cache exactly as
KVCache.update does (fp16 rounding as numpy's), and reject bad input cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402

from edgelm.backends import cpu, native  # noqa: E402
from edgelm.runtime.engine import Engine  # noqa: E402

if not native.available():
    pytest.fail(f"native kernels are not built/importable: {native.unavailable_reason()}", pytrace=False)

ISAS = [i for i in native.ALL_ISAS if native.cpu_supports(i)]


class LoopOps(cpu.CpuOps):
    """The cpu op table without the fused path: models/gemma3.forward's per-op loop."""

    fused_plans = frozenset()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edgelm.convert import convert, load_source

    root = tmp_path_factory.mktemp("block")
    # hidden 64, 4 heads of 16 over 2 kv heads; 5 layers (L L G L L) with a window of 6, so
    # decode steps wrap the sliding rings
    d = fx.make_tiny_gemma3(root / "hf", seed=3, layers=5, sliding_window=6, attn_logit_softcapping=30.0)
    out = {}
    for scheme in ("fp32", "int8", "int8-b32", "int4-b32"):
        out[scheme] = root / f"{scheme}.edgelm"
        convert(load_source(d), out[scheme], scheme=scheme, progress=False)
    return out


def _run(bundle, ops_cls, isa, kv, steps, prefill=11, chunk=4):
    e = Engine(bundle, backend=ops_cls(isa), max_tokens=128, kv_dtype=kv, prefill_chunk=chunk)
    s = e.create_session({"temperature": 0.0})
    vocab = e.config.vocab_size
    ids = [(7 * i + 3) % vocab for i in range(prefill)]
    outs = [s.prefill(ids)]
    for t in steps:  # decode steps of 1..3 tokens, as chunks of a continued prompt
        outs.append(s._forward([(5 * t + 1 + j) % vocab for j in range(t % 3 + 1)], "all"))
    caches = [(c.k.copy(), c.v.copy(), c.pos.copy(), c.filled) for c in s.caches]
    return outs, caches


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", ["fp32", "int8", "int8-b32", "int4-b32"])
@pytest.mark.parametrize("kv", ["f16", "f32"])
@pytest.mark.parametrize("prefill,chunk", [(11, 4), (45, 20)])  # 20-token chunks: the packed GEMM
def test_fused_blocks_are_bitwise_the_loop(bundles, isa, scheme, kv, prefill, chunk):
    steps = list(range(14))  # 25+ positions: the window-6 rings wrap several times
    fused, cf = _run(bundles[scheme], cpu.CpuOps, isa, kv, steps, prefill, chunk)
    loop, cl = _run(bundles[scheme], LoopOps, isa, kv, steps, prefill, chunk)
    for a, b in zip(fused, loop):
        np.testing.assert_array_equal(a, b)
    for (k1, v1, p1, f1), (k2, v2, p2, f2) in zip(cf, cl):
        assert f1 == f2 and k1.dtype == (np.float16 if kv == "f16" else np.float32)
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(k1.view(np.uint8), k2.view(np.uint8))
        np.testing.assert_array_equal(v1.view(np.uint8), v2.view(np.uint8))


def _run_batch(bundle, ops_cls, isa, kv, steps, prompts=(3, 9, 14, 5, 1)):
    e = Engine(bundle, backend=ops_cls(isa), max_tokens=128, kv_dtype=kv)
    vocab = e.config.vocab_size
    ss = [e.create_session({"temperature": 0.0}) for _ in prompts]
    toks = [int(np.argmax(s.prefill([(11 * i + 5 * j + 2) % vocab for j in range(m)])))
            for i, (s, m) in enumerate(zip(ss, prompts))]
    outs = []
    for _ in range(steps):
        logits = e.decode_batch(ss, toks)
        outs.append(logits)
        toks = [int(t) for t in logits.argmax(1)]
    return outs, [[(c.k.copy(), c.v.copy(), c.pos.copy(), c.filled) for c in s.caches] for s in ss]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", ["fp32", "int8-b32", "int4-b32"])
@pytest.mark.parametrize("kv", ["f16", "f32"])
def test_fused_batched_decode_is_bitwise_the_loop(bundles, isa, scheme, kv):
    """Engine.decode_batch runs every block in one native call too (seq_rows: the products on
    all sequences' rows, each sequence's cache write and attention on its own cache): bitwise
    the per-op loop, sequences of different lengths, windows wrapping."""
    fused, cf = _run_batch(bundles[scheme], cpu.CpuOps, isa, kv, 12)
    loop, cl = _run_batch(bundles[scheme], LoopOps, isa, kv, 12)
    for a, b in zip(fused, loop):
        np.testing.assert_array_equal(a, b)
    for sf, sl in zip(cf, cl):
        for (k1, v1, p1, f1), (k2, v2, p2, f2) in zip(sf, sl):
            assert f1 == f2
            np.testing.assert_array_equal(p1, p2)
            np.testing.assert_array_equal(k1.view(np.uint8), k2.view(np.uint8))
            np.testing.assert_array_equal(v1.view(np.uint8), v2.view(np.uint8))


@pytest.mark.parametrize("ops_cls", [cpu.CpuOps, LoopOps])
def test_last_block_computes_only_the_wanted_rows(bundles, ops_cls):
    """A prefill wants the last token's logits only (and an inner chunk none): past its K/V
    write the last block computes just those rows, in the fused call and the loop alike. In
    deterministic mode (every route gives a row the same bits) the logits are bitwise the
    all-rows forward's last row, and the caches (every row's K and V) are the same bytes."""
    e = Engine(bundles["int8-b32"], backend=ops_cls(), max_tokens=128, deterministic=True, prefill_chunk=8)
    vocab = e.config.vocab_size
    ids = [(7 * i + 3) % vocab for i in range(21)]  # chunks of 8, 8, 5
    a, b = e.create_session({"temperature": 0.0}), e.create_session({"temperature": 0.0})
    last = a.prefill(ids)
    rows = np.concatenate([b._forward(ids[i:i + 8], "all") for i in range(0, len(ids), 8)])
    np.testing.assert_array_equal(last, rows[-1])
    for ca, cb in zip(a.caches, b.caches):
        assert ca.filled == cb.filled
        np.testing.assert_array_equal(ca.k[:ca.filled].view(np.uint8), cb.k[:cb.filled].view(np.uint8))
        np.testing.assert_array_equal(ca.v[:ca.filled].view(np.uint8), cb.v[:cb.filled].view(np.uint8))
    # positions k.. of a chunk, and the next decode step on top of either session
    c = e.create_session({"temperature": 0.0})
    c.prefill(ids[:13])
    np.testing.assert_array_equal(c._forward(ids[13:], 3), rows[16:])
    np.testing.assert_array_equal(a.decode_step(5), b.decode_step(5))


def test_fused_path_is_taken_for_prefill_chunks_and_decode_steps(bundles, monkeypatch):
    calls = []
    real = cpu.CpuOps.gemma3_blocks

    def spy(self, cfg, w, x, h, positions, caches, **kw):
        calls.append(x.shape[0])
        return real(self, cfg, w, x, h, positions, caches, **kw)

    monkeypatch.setattr(cpu.CpuOps, "gemma3_blocks", spy)
    e = Engine(bundles["int8"], max_tokens=64, prefill_chunk=16)
    s = e.create_session({"temperature": 0.0})
    s.prefill(list(range(3, 30)))  # chunks of 16 and 11
    s.decode_step(5)
    assert calls == [16, 11, 1]


@pytest.mark.parametrize("isa", ISAS)
def test_float_to_half_rounds_like_numpy(isa):
    m = native.kernels(isa).module
    r = np.random.default_rng(0)
    edges = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65519.99, 65520.0, 70000.0, -1e9, np.inf, -np.inf,
                      2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 3 * 2.0 ** -25,
                      6.1e-5, 5.96e-8, 1e-10, 1.0009765625, 1.00048828125, 1.00146484375], np.float32)
    # exact ties between adjacent halves, both parities, normal and subnormal
    h = r.integers(0, 0x7bff, 4000).astype(np.uint16)
    lo, hi = h.view(np.float16).astype(np.float32), (h + 1).view(np.float16).astype(np.float32)
    ties = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
    rnd = np.concatenate([r.standard_normal(5000) * 10.0 ** r.integers(-9, 6, 5000)]).astype(np.float32)
    for x in (edges, ties, -ties, rnd):
        got = np.asarray(m.float_to_half(x))
        with np.errstate(over="ignore"):  # numpy warns on the values that overflow to inf
            want = x.astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(got, want)
    nan = np.asarray(m.float_to_half(np.array([np.nan] * 9, np.float32))).view(np.float16)
    assert np.isnan(nan).all()


def test_bad_input_is_rejected(bundles):
    e = Engine(bundles["int8"], max_tokens=64)
    ops = e.ops
    plan = ops._g3_plan(e.config, e.weights)
    s = e.create_session()
    caches = [(c.k, c.v, c.pos) for c in s.caches]
    hid, hd = e.config.hidden_size, e.config.head_dim
    x = np.zeros((1, hid), np.float32)
    h = np.zeros((1, hid), np.float32)
    t = np.zeros((1, hd // 2), np.float32)
    filled = np.zeros(len(caches), np.int64)
    pos = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="shape"):
        plan.forward(np.zeros((1, hid + 1), np.float32), h, pos, t, t, t, t, caches, filled)
    with pytest.raises(ValueError, match="one cache per block"):
        plan.forward(x, h, pos, t, t, t, t, caches[:-1], filled)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        plan.forward(x, h, np.array([-1], np.int64), t, t, t, t, caches, filled)
    with pytest.raises(ValueError, match="filled out of range"):
        plan.forward(x, h, pos, t, t, t, t, caches, filled + 10_000)
    with pytest.raises(ValueError, match="overlap"):
        plan.forward(x, x, pos, t, t, t, t, caches, filled)
    with pytest.raises(TypeError):
        plan.forward(x, h, pos.astype(np.int32), t, t, t, t, caches, filled)
    bad = [(c[0].astype(np.float64), c[1], c[2]) for c in caches]
    with pytest.raises(TypeError):
        plan.forward(x, h, pos, t, t, t, t, bad, filled)
    # batched decode: rows per sequence, one cache per block and sequence, no cache shared
    s2 = e.create_session()
    caches2 = caches + [(c.k, c.v, c.pos) for c in s2.caches]
    x2, h2, t2 = np.zeros((2, hid), np.float32), np.zeros((2, hid), np.float32), np.zeros((2, hd // 2), np.float32)
    pos2 = np.zeros(2, np.int64)
    filled2 = np.zeros(len(caches2), np.int64)
    with pytest.raises(ValueError, match="sum to the rows"):
        plan.forward(x2, h2, pos2, t2, t2, t2, t2, caches2, filled2, seq_rows=[1, 2])
    with pytest.raises(ValueError, match="seq_rows must be >= 1"):
        plan.forward(x2, h2, pos2, t2, t2, t2, t2, caches2, filled2, seq_rows=[2, 0])
    with pytest.raises(ValueError, match="one cache per block and sequence"):
        plan.forward(x2, h2, pos2, t2, t2, t2, t2, caches, filled2, seq_rows=[1, 1])
    with pytest.raises(ValueError, match="share memory"):
        plan.forward(x2, h2, pos2, t2, t2, t2, t2, caches + caches, filled2, seq_rows=[1, 1])
    with pytest.raises(TypeError, match="seq_rows"):
        plan.forward(x2, h2, pos2, t2, t2, t2, t2, caches2, filled2, seq_rows=[1, "1"])
    assert np.all(filled2 == 0)
    with pytest.raises(ValueError, match="bad dimensions"):
        ops._m.Gemma3Blocks([], hid, 3, 2, hd, 8, 6, 1e-6, 1.0, 0.0)
    with pytest.raises(ValueError, match="no blocks"):
        ops._m.Gemma3Blocks([], hid, 4, 2, hd, 8, 6, 1e-6, 1.0, 0.0)
    assert np.all(filled == 0)  # nothing ran


def test_phase_clock_counts_every_phase(bundles):
    """set_phase_timing(1) times each phase of the fused blocks (microbench.py decode-phases):
    one call per block and phase, the products' weight bytes, the filled K/V bytes for
    attention; nothing is counted while it is off."""
    e = Engine(bundles["int4-b32"], max_tokens=64, kv_dtype="f16")
    m = e.ops._m
    s = e.create_session({"temperature": 0.0})
    s.prefill([5, 9, 13])
    m.phase_times(True)
    s.decode_step(21)
    assert all(v == (0.0, 0, 0) for v in m.phase_times(True).values())
    m.set_phase_timing(1)
    try:
        s.decode_step(22)
    finally:
        m.set_phase_timing(0)
    ph = m.phase_times(True)
    cfg, blocks = e.config, e.weights.layers
    nl = cfg.num_layers
    assert set(ph) == {"qkv", "norm_rope_cache", "attention", "o", "add_norm_attn", "gate_up", "down", "add_norm_ffn"}
    assert all(calls == nl and sec >= 0 for sec, calls, _ in ph.values())

    def wbytes(t):  # data + scales, as the kernels read them
        return sum(a.nbytes for a in native._weight_parts(t)[:2] if a is not None)

    assert ph["qkv"][2] == sum(wbytes(b.q) + wbytes(b.k) + wbytes(b.v) for b in blocks)
    assert ph["o"][2] == sum(wbytes(b.o) for b in blocks)
    assert ph["gate_up"][2] == sum(wbytes(b.gate) + wbytes(b.up) for b in blocks)
    assert ph["down"][2] == sum(wbytes(b.down) for b in blocks)
    kvd = cfg.num_kv_heads * cfg.head_dim
    filled = [c.filled for c in s.caches]  # the slots attention read, this step's included
    assert filled == [5] * nl
    assert ph["attention"][2] == sum(2 * f * kvd * 2 for f in filled)
    assert ph["norm_rope_cache"][2] == 0
