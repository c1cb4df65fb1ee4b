"""Batch invariance (Engine(deterministic=True), docs/kernels.md "Batch invariance"): a row's
results are the same bits whatever else is in the call. Checked on every native build this
CPU runs (scalar, avx2, avx512, the emulated-VNNI build): products of every scheme one row
at a time, in chunks and whole (odd row counts, odd block counts, a partial int8 block),
attention with holes, windows, ring order and both KV dtypes, and whole models: logits of a
prompt prefilled whole, in chunks of 1, 7 and 128, decoded step by step, after a rewind and
in a clone are bitwise equal; the server answers the same request the same way streamed or
not, with its prompt cached or not; thread count changes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm import Engine
from edgelm.backends import native
from edgelm.errors import BadInputError
from edgelm.quant import schemes

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
ISAS = native.available_isas() if native.available() else []
SCHEMES = ["int8", "int8-b32", "int4-b32", "int4-b128", "fp16", "fp32"]


@pytest.fixture(params=ISAS)
def kern(request):
    k = native.kernels(request.param)
    threads = k.get_threads()
    k.module.set_deterministic(1)
    yield k
    k.module.set_deterministic(0)
    k.set_threads(threads)


def _splits(n):
    return [[(i, i + 1) for i in range(n)], [(i, min(n, i + 7)) for i in range(0, n, 7)],
            [(0, 3), (3, 20), (20, n)]]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("rows,cols", [(83, 640), (40, 608), (17, 650)])
def test_products_do_not_depend_on_the_other_rows(kern, scheme, rows, cols):
    if scheme in ("int8-b32", "int4-b32", "int4-b128", "fp16") and cols % (128 if scheme == "int4-b128" else 32):
        pytest.skip("the scheme needs whole blocks")
    rng = np.random.default_rng(rows + cols)
    t = schemes.quantize(rng.normal(size=(rows, cols)).astype(np.float32), scheme)
    x = rng.normal(size=(41, cols)).astype(np.float32)
    whole = kern.matmul(x, t)
    for parts in _splits(41):
        got = np.concatenate([kern.matmul(x[a:b], t) for a, b in parts])
        assert np.array_equal(got, whole), (scheme, parts[:2])
    kern.set_threads(1)
    assert np.array_equal(np.concatenate([kern.matmul(x[i:i + 1], t) for i in range(41)]), whole)


@pytest.mark.parametrize("kv", [np.float32, np.float16])
@pytest.mark.parametrize("window", [0, 24])
def test_attention_does_not_depend_on_chunks_or_the_cache(kern, kv, window):
    rng = np.random.default_rng(window)
    T, H, KV, hd = 150, 4, 2, 32
    q = rng.normal(size=(T, H, hd)).astype(np.float32)
    k = rng.normal(size=(T, KV, hd)).astype(kv)
    v = rng.normal(size=(T, KV, hd)).astype(kv)
    pos = np.arange(T)
    whole = kern.attention(q, k, v, pos, pos, window, 0.125, 30.0)
    for parts in _splits(T):
        got = np.concatenate([kern.attention(q[a:b], k[:b], v[:b], pos[a:b], pos[:b], window, 0.125, 30.0)
                              for a, b in parts])
        assert np.array_equal(got, whole)
    # a cache with more (empty or future) slots than the query needs
    extra_k = np.concatenate([k, rng.normal(size=(70, KV, hd)).astype(kv)])
    extra_v = np.concatenate([v, rng.normal(size=(70, KV, hd)).astype(kv)])
    kpos = np.concatenate([pos, np.full(70, -1)])
    kpos[T + 5:T + 9] = T + 100  # future positions: invisible
    got = np.concatenate([kern.attention(q[i:i + 1], extra_k, extra_v, pos[i:i + 1], kpos, window, 0.125, 30.0)
                          for i in range(T - 10, T)])
    assert np.array_equal(got, whole[T - 10:])
    kern.set_threads(1)
    assert np.array_equal(kern.attention(q, k, v, pos, pos, window, 0.125, 30.0), whole)


def test_ring_order_attention(kern):
    """A sliding-window ring keeps positions out of slot order; a query's keys are still read
    in slot order, the same for a lone query and a chunk."""
    rng = np.random.default_rng(3)
    slots, H, KV, hd, W = 20, 2, 1, 32, 16
    k = rng.normal(size=(slots, KV, hd)).astype(np.float32)
    v = rng.normal(size=(slots, KV, hd)).astype(np.float32)
    kpos = (np.arange(slots) + 33) % slots + 40  # positions 40..59, wrapped
    q = rng.normal(size=(6, H, hd)).astype(np.float32)
    qpos = np.arange(54, 60)
    whole = kern.attention(q, k, v, qpos, kpos, W, 0.2)
    one = np.concatenate([kern.attention(q[i:i + 1], k, v, qpos[i:i + 1], kpos, W, 0.2) for i in range(6)])
    assert np.array_equal(one, whole)


def _quant_bundle(scheme: str) -> Path:
    from edgelm.convert import convert, load_source

    src = tiny_bundle()  # built first: its HF directory sits beside it
    out = src.parent / f"det-{scheme}.edgelm"
    if not out.exists():
        convert(load_source(src.parent / "chat-hf"), out, scheme=scheme, progress=False)
    return out


def _variants(eng, ids):
    """Logits of every position of ids, computed in different ways."""
    ref = eng.create_session().prefill(ids, return_logits=True)
    out = {}
    for c in (1, 7, 128):
        s = eng.create_session()
        out[f"chunks of {c}"] = np.concatenate([s.prefill(ids[i:i + c], return_logits=True)
                                                for i in range(0, len(ids), c)])
    s = eng.create_session()
    out["decode"] = np.concatenate([s.prefill(ids[:3], return_logits=True)] + [s.decode_step(t)[None]
                                                                               for t in ids[3:]])
    s = eng.create_session()
    s.prefill(ids)
    assert s.rewind(len(ids) - 9)
    out["rewind"] = np.concatenate([ref[:len(ids) - 9], s.prefill(ids[len(ids) - 9:], return_logits=True)])
    s = eng.create_session()
    s.prefill(ids[:20])
    fork = s.clone()
    out["clone"] = np.concatenate([ref[:20], fork.prefill(ids[20:], return_logits=True)])
    return ref, out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", ["fp32", "int8-b32", "int4-b32"])
def test_model_logits_are_bitwise_equal_however_computed(isa, scheme):
    from edgelm.backends.cpu import CpuOps

    path = tiny_bundle() if scheme == "fp32" else _quant_bundle(scheme)
    eng = Engine(path, backend=CpuOps(isa, deterministic=True), max_tokens=256, prefill_chunk=64)
    assert eng.deterministic
    rng = np.random.default_rng(0)
    ids = [eng.tokenizer.bos_id] + [int(i) for i in rng.integers(10, eng.tokenizer.vocab_size, 52)]
    ref, variants = _variants(eng, ids)
    for name, got in variants.items():
        assert np.array_equal(got, ref), (isa, scheme, name, np.abs(got - ref).max())


def test_default_mode_is_not_batch_invariant_here():
    """What the mode is for: the fastest kernels do depend on the chunking (if this ever
    starts to pass, the default kernels became invariant and the docs should say so)."""
    from edgelm.backends.cpu import CpuOps

    if native._default().isa not in ("avx2", "avx512"):
        pytest.skip("the default kernels of this build are not the ones measured")
    eng = Engine(_quant_bundle("int8-b32"), backend=CpuOps(), max_tokens=256, prefill_chunk=64)
    rng = np.random.default_rng(0)
    ids = [eng.tokenizer.bos_id] + [int(i) for i in rng.integers(10, eng.tokenizer.vocab_size, 52)]
    ref, variants = _variants(eng, ids)
    assert not all(np.array_equal(v, ref) for v in variants.values())


def test_engine_setting_and_bad_values(monkeypatch):
    eng = Engine(tiny_bundle(), deterministic=True)
    assert eng.deterministic and eng.ops.deterministic
    assert not Engine(tiny_bundle()).deterministic
    monkeypatch.setenv("EDGELM_DETERMINISTIC", "1")
    assert Engine(tiny_bundle()).deterministic
    assert not Engine(tiny_bundle(), deterministic=False).deterministic
    monkeypatch.setenv("EDGELM_DETERMINISTIC", "maybe")
    with pytest.raises(BadInputError, match="EDGELM_DETERMINISTIC"):
        Engine(tiny_bundle())
    monkeypatch.delenv("EDGELM_DETERMINISTIC")
    with pytest.raises(BadInputError, match="numpy backend"):
        Engine(tiny_bundle(), backend="numpy", deterministic=True)
    with pytest.raises(BadInputError, match="deterministic"):
        Engine(tiny_bundle(), deterministic="yes")


def test_two_engines_keep_their_own_setting():
    """The native switch belongs to the calling thread and is set by each engine's op table
    before its calls: a deterministic engine and a default one interleave safely."""
    path = _quant_bundle("int8-b32")
    det, fast = Engine(path, deterministic=True), Engine(path)
    rng = np.random.default_rng(1)
    ids = [det.tokenizer.bos_id] + [int(i) for i in rng.integers(10, det.tokenizer.vocab_size, 30)]
    a = det.create_session()
    b = fast.create_session()
    whole = det.create_session().prefill(ids, return_logits=True)
    steps = [a.prefill(ids[:1], return_logits=True)]
    for t in ids[1:]:
        b.decode_step(t) if b.n_tokens else b.prefill([t])  # the other engine runs between steps
        steps.append(a.decode_step(t)[None])
    assert np.array_equal(np.concatenate(steps), whole)


def test_server_same_request_same_text():
    """The reported case: a request streamed, then the same request again (its prompt now
    cached) at temperature 0, give the same text."""
    openai = pytest.importorskip("openai")
    from edgelm.server import BackgroundServer, create_app

    eng = Engine(_quant_bundle("int8-b32"), deterministic=True, max_tokens=512)
    with BackgroundServer(create_app(eng, model_name="m")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Count to five."}]
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="m", messages=msgs, max_tokens=40, temperature=0, stream=True) if ch.choices)
        again = client.chat.completions.create(model="m", messages=msgs, max_tokens=40, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        assert again.choices[0].message.content == streamed
        longer = msgs + [{"role": "assistant", "content": streamed}, {"role": "user", "content": "Again."}]
        first = client.chat.completions.create(model="m", messages=longer, max_tokens=20, temperature=0)
        fresh = Engine(_quant_bundle("int8-b32"), deterministic=True, max_tokens=512)
        with BackgroundServer(create_app(fresh, model_name="m")) as srv2:
            c2 = openai.OpenAI(base_url=srv2.url + "/v1", api_key="-", max_retries=0, timeout=60)
            cold = c2.chat.completions.create(model="m", messages=longer, max_tokens=20, temperature=0)
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert cold.choices[0].message.content == first.choices[0].message.content


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8-b32", "int4-b32"])
def test_real_model_is_batch_invariant(real_gguf, tmp_path_factory, scheme):
    from edgelm.convert import convert, load_source

    out = tmp_path_factory.mktemp("det") / f"m.{scheme}.edgelm"
    convert(load_source(real_gguf), out, scheme=scheme, progress=False)
    eng = Engine(out, deterministic=True, max_tokens=512)
    ids = eng.tokenize("Count to five. The capital of France is Paris, and the capital of Italy is Rome; "
                       "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)", add_bos=True)[:48]
    ref, variants = _variants(eng, ids)
    for name, got in variants.items():
        assert np.array_equal(got, ref), (scheme, name, np.abs(got - ref).max())


@pytest.mark.parametrize("deterministic", [False, True])
def test_thread_count_changes_nothing(deterministic):
    """Rows are split over threads, never the sums: 1 and 2 threads give the same bits, in
    both modes."""
    path = _quant_bundle("int8-b32")
    threads = native.get_threads()
    rng = np.random.default_rng(2)
    try:
        got = []
        for t in (1, 2):
            eng = Engine(path, deterministic=deterministic, threads=t, max_tokens=256)
            ids = [eng.tokenizer.bos_id] + [int(i) for i in rng.integers(10, eng.tokenizer.vocab_size, 40)]
            rng = np.random.default_rng(2)
            s = eng.create_session()
            got.append(np.concatenate([s.prefill(ids[:30], return_logits=True)]
                                      + [s.decode_step(i)[None] for i in ids[30:]]))
        assert np.array_equal(got[0], got[1])
    finally:
        native.set_threads(threads)


def test_gemma3n_logits_are_bitwise_equal_however_computed(tmp_path):
    """Gemma 3n's host-side ops (AltUp, Laurel, per-layer inputs) are per row too."""
    import gemma3n_fixtures as g3n
    from edgelm.convert import convert, load_source

    g3n.make_tiny_gemma3n(tmp_path / "hf")
    out = tmp_path / "m.edgelm"
    convert(load_source(tmp_path / "hf"), out, scheme="int8-b32", progress=False)
    eng = Engine(out, deterministic=True, max_tokens=256, prefill_chunk=64)
    rng = np.random.default_rng(0)
    ids = [eng.tokenizer.bos_id] + [int(i) for i in rng.integers(10, eng.tokenizer.vocab_size, 40)]
    ref, variants = _variants(eng, ids)
    for name, got in variants.items():
        assert np.array_equal(got, ref), (name, np.abs(got - ref).max())
