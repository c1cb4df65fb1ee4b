"""Continuous batching in the server (create_app(parallel=N), `edgelm serve --parallel N`):
requests decoded together give the answers they get alone (deterministic kernels: bit for
bit), streamed or not, seeded or greedy, constrained or not; a client that leaves frees its
slot; Engine.decode_batch rows equal each session's own decode_step."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_determinism import _quant_bundle  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from edgelm import Engine  # noqa: E402
from edgelm.errors import BadInputError  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402

PROMPTS = ["Count to five.", "Name a color.", "What is 2+2?", "Say hello.", "Tell a story.", "Why?"]


@pytest.fixture(scope="module")
def eng():
    e = Engine(_quant_bundle("int8-b32"), deterministic=True, max_tokens=512)
    yield e
    e.close()


def test_decode_batch_rows_are_each_sessions_own(eng):
    a = [eng.create_session() for _ in PROMPTS]
    b = [eng.create_session() for _ in PROMPTS]
    ta = [int(np.argmax(s.prefill(eng.tokenize(p, add_bos=True)))) for s, p in zip(a, PROMPTS)]
    tb = list(ta)
    for s, p in zip(b, PROMPTS):
        s.prefill(eng.tokenize(p, add_bos=True))
    for _ in range(6):
        la = eng.decode_batch(a, ta)
        lb = np.stack([s.decode_step(t) for s, t in zip(b, tb)])
        assert np.array_equal(la, lb)
        ta = tb = [int(x) for x in la.argmax(1)]
    assert [s.n_tokens for s in a] == [s.n_tokens for s in b]
    with pytest.raises(BadInputError, match="twice"):
        eng.decode_batch([a[0], a[0]], [1, 2])
    with pytest.raises(BadInputError, match="one token per session"):
        eng.decode_batch(a[:2], [1])


def _answers(url, temperature, seed=None, stream=False, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120)

    def one(i):
        msgs = [{"role": "user", "content": PROMPTS[i]}]
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
                model="m", messages=msgs, max_tokens=24, temperature=temperature, seed=seed, stream=True, **kw)
                if ch.choices)
        return client.chat.completions.create(model="m", messages=msgs, max_tokens=24, temperature=temperature,
                                              seed=seed, **kw).choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS)) as ex:
        return list(ex.map(one, range(len(PROMPTS))))


def test_batched_answers_equal_the_answers_alone(eng):
    with BackgroundServer(create_app(eng, model_name="m")) as solo:
        alone = [_answers(solo.url, 0), _answers(solo.url, 1.0, seed=3)]
    app = create_app(eng, model_name="m", parallel=4)
    with BackgroundServer(app) as srv:
        assert _answers(srv.url, 0) == alone[0]
        assert _answers(srv.url, 0, stream=True) == alone[0]
        assert _answers(srv.url, 1.0, seed=3) == alone[1]
        health = httpx.get(srv.url + "/health").json()
        assert health["parallel"] == 4 and health["active"] == 0
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        rf = {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
        for text in _answers(srv.url, 1.0, seed=1, response_format=rf):
            assert json.loads(text)["ok"] in (True, False)


def test_disconnect_frees_the_slot(eng):
    app = create_app(eng, model_name="m", parallel=2)
    sched = app.state.scheduler
    with BackgroundServer(app) as srv:
        body = {"messages": [{"role": "user", "content": "Go on and on"}], "max_tokens": 400, "temperature": 0,
                "stream": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", srv.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            deadline = time.time() + 10
            while sched.stats()["active"] == 0 and time.time() < deadline:
                time.sleep(0.01)
            assert sched.stats()["active"] == 1
        deadline = time.time() + 10
        while sched.stats()["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert sched.stats()["active"] == 0
        assert sched.recent[-1][1] == "cancelled"
        # and it still serves
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                 "max_tokens": 3}, timeout=30)
        assert r.status_code == 200


def test_bad_parallel(eng):
    for bad in (0, 65, True, "2"):
        with pytest.raises(BadInputError, match="parallel"):
            create_app(eng, parallel=bad)


def test_n_choices_share_one_prefill(eng):
    app = create_app(eng, model_name="m", parallel=4)
    msgs = [{"role": "user", "content": "Tell me something about the sea, please."}]
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        prefilled = {}
        texts = {}
        for ch in client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=1.0,
                                                 seed=11, n=3, stream=True):
            for c in ch.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                if c.finish_reason:
                    prefilled[c.index] = ch.model_extra["timings"]["prefilled_tokens"]
        assert prefilled == {0: 1, 1: 1, 2: 1}  # the prompt was prefilled once, outside the choices
        singles = [client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=1.0,
                                                  seed=11 + i).choices[0].message.content for i in range(3)]
        assert [texts[i] for i in range(3)] == singles


def test_steps_yield_between_prefill_chunks():
    from edgelm.runtime.session import DecodeRequest

    e = Engine(_quant_bundle("int8-b32"), max_tokens=512, prefill_chunk=16)
    s = e.create_session({"temperature": 0})
    ids = [e.tokenizer.bos_id] + [10 + i % 50 for i in range(99)]
    kinds = []
    gen = s.steps(ids, max_new_tokens=3)
    msg = next(gen)
    try:
        while True:
            kinds.append(type(msg).__name__)
            msg = gen.send(s.decode_step(msg.token)) if isinstance(msg, DecodeRequest) else next(gen)
    except StopIteration:
        pass
    assert kinds.count("PrefillProgress") == 6  # 100 tokens in chunks of 16: 7 chunks, 6 pauses
    assert kinds[-1] == "GenerationStats" and kinds.count("DecodeRequest") == 2
    # generate() drives the same coroutine: the same tokens
    g = e.create_session({"temperature": 0})
    list(g.generate(ids, max_new_tokens=3))
    assert g.generated_ids == s.generated_ids and len(g.generated_ids) == 3


def test_long_prompt_prefills_between_decode_steps():
    """A long prompt joining is prefilled a chunk at a time between the running requests'
    decode steps: they keep producing tokens meanwhile."""
    e = Engine(_quant_bundle("int8-b32"), max_tokens=1024, prefill_chunk=8)
    app = create_app(e, model_name="m", parallel=2)
    with BackgroundServer(app) as srv:
        stamps = []
        started = threading.Event()

        def stream_a():
            body = {"prompt": "Once", "max_tokens": 600, "temperature": 0, "stream": True}
            with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.perf_counter())
                        if len(stamps) == 5:
                            started.set()

        ta = threading.Thread(target=stream_a)
        ta.start()
        assert started.wait(30)
        long_prompt = [e.tokenizer.bos_id] + [10 + i % 50 for i in range(500)]
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 1, "temperature": 0},
                       timeout=60)
        t1 = time.perf_counter()
        ta.join(60)
        assert r.status_code == 200
        during = sum(t0 <= t <= t1 for t in stamps)
        assert during >= 30, during  # 63 chunks of 8, each followed by one step of A


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for memory use")
def test_load_with_random_disconnects(eng):
    """200 requests from 32 clients on 8 slots, a quarter of them dropped mid-stream: every
    other request gets the answer it gets alone, no 500, no leaked session or slot, memory
    flat."""
    import gc
    import random

    prompts = [f"Question number {i}?" for i in range(6)]
    with BackgroundServer(create_app(eng, model_name="m")) as solo:
        want = {p: httpx.post(solo.url + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0},
                              timeout=60).json()["choices"][0]["text"] for p in prompts}
    app = create_app(eng, model_name="m", parallel=8, max_queue=256)
    sched = app.state.scheduler
    with BackgroundServer(app) as srv:
        def one(i):
            rnd = random.Random(i)
            p = prompts[i % len(prompts)]
            body = {"prompt": p, "max_tokens": 8, "temperature": 0}
            if rnd.random() < 0.25:  # leave after the first chunk
                with httpx.Client(timeout=60) as c, c.stream("POST", srv.url + "/v1/completions",
                                                             json={**body, "max_tokens": 200, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            break
                return None
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
            return p, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        def round_(n):
            with ThreadPoolExecutor(32) as ex:
                return [x for x in ex.map(one, range(n)) if x is not None]

        round_(200)  # warm-up: the same load once (allocator, client threads, sessions)
        gc.collect()
        before = _rss()
        results = round_(200)
        assert all(code == 200 for _, code, _ in results), [r for r in results if r[1] != 200][:3]
        assert all(text == want[p] for p, _, text in results)
        deadline = time.time() + 30
        while (sched.stats()["active"] or sched.stats()["queued"]) and time.time() < deadline:
            time.sleep(0.05)
        st = sched.stats()
        assert st["active"] == 0 and st["queued"] == 0
        gc.collect()
        assert st["live_sessions"] <= sched.pool_size + sched.parallel
        grown = _rss() - before
        assert grown < 0.05 * before + 16 * 2 ** 20, f"memory grew by {grown / 2 ** 20:.1f} MiB"


def test_auto_parallel_follows_memory(eng, monkeypatch):
    import os

    from edgelm.server.scheduler import MAX_AUTO_PARALLEL, auto_parallel

    assert auto_parallel(eng) == MAX_AUTO_PARALLEL  # a tiny model's caches: plenty of room
    real = os.sysconf

    def small(name):  # 64 pages of 4 KiB available: not even one cache fits a quarter of it
        return 64 if name == "SC_AVPHYS_PAGES" else 4096 if name == "SC_PAGE_SIZE" else real(name)

    monkeypatch.setattr(os, "sysconf", small)
    assert auto_parallel(eng) == 1


@pytest.mark.parametrize("parallel", [1, 3])
def test_prefix_cache_keeps_more_prefixes_within_its_byte_budget(eng, parallel):
    """Past the pool of 2 idle sessions, finished requests' KV stays while it fits the byte
    budget, least recently used dropped first: with a budget, the first of five different
    system prompts is still reused after the other four; with none, the pool alone has
    dropped it."""
    systems = [f"You are assistant {i}. " + "Answer briefly and politely. " * 12 for i in range(5)]

    def cached(url, system):
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    for budget, kept in ((64 << 20, True), (0, False)):
        app = create_app(eng, model_name="m", parallel=parallel, prefix_cache_bytes=budget)
        with BackgroundServer(app) as srv:
            for s in systems:
                assert cached(srv.url, s) == 0
            again = cached(srv.url, systems[0])
            st = app.state.scheduler.stats()
            metrics = httpx.get(srv.url + "/metrics").text
            assert f"edgelm_cached_prefix_sessions {float(st['idle_sessions'])}" in metrics
        assert (again > 100) == kept, (budget, again)
        if kept:  # every system prompt's session stays, within the budget
            assert st["idle_sessions"] >= 5 and st["cached_prefix_bytes"] <= budget
            app2 = create_app(eng, model_name="m", parallel=parallel, prefix_cache_bytes=budget)
            with BackgroundServer(app2) as srv2:
                for i in range(4):  # the same request again and again: no copies pile up
                    assert (cached(srv2.url, systems[1]) > 100) == (i > 0)
                assert app2.state.scheduler.stats()["idle_sessions"] == 1
        else:
            assert st["idle_sessions"] <= 2
    # a budget smaller than one prompt's KV keeps at most the pool's 2 sessions
    app = create_app(eng, model_name="m", parallel=parallel, prefix_cache_bytes=1)
    with BackgroundServer(app) as srv:
        for s in systems:
            cached(srv.url, s)
        assert app.state.scheduler.stats()["idle_sessions"] <= 2
