"""The OpenAI-compatible server on a tiny random model: the official `openai` client
(streaming and not), raw HTTP for errors (400/401/404/405/413/429), disconnect cancelling,
and a bounded load test. Every server binds 127.0.0.1 on a free port and stops at the end."""

from __future__ import annotations

import gc
import json
import re
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgelm import Engine  # noqa: E402
from edgelm.runtime.conversation import render_chat  # noqa: E402
from edgelm.runtime.session import GenerationStats  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402

KEY = "sk-test-123"
CAP = 1024


@pytest.fixture(scope="module")
def eng():
    e = Engine(tiny_bundle(), max_tokens=CAP)
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(eng):
    app = create_app(eng, max_queue=64, max_body_bytes=64 * 1024, model_name="tiny")
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(eng, ids, n, stop=None):
    s = eng.create_session({"temperature": 0.0})
    text, stats = "", None
    for p in s.generate(ids, max_new_tokens=n, stop=stop):
        if isinstance(p, GenerationStats):
            stats = p
        else:
            text += p
    return text, stats


def chat_expect(eng, messages, n, stop=None):
    _, ids = render_chat(eng, messages)
    return greedy(eng, ids, n, stop) + (len(ids),)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]


# ----------------------------------------------------------------------------- openai client


def test_chat_completion(client, eng):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    want, stats, n_prompt = chat_expect(eng, MSGS, 8)
    assert r.object == "chat.completion" and r.model == "tiny"
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 8
    assert r.usage.total_tokens == n_prompt + 8


def test_chat_streaming_matches_and_reports_usage(client, eng):
    msgs = MSGS + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "What is the capital?"}]
    want, _, n_prompt = chat_expect(eng, msgs, 10)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens == n_prompt and usage.completion_tokens == 10
    # the same conversation again reuses the cached prompt
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens_details.cached_tokens >= n_prompt - 1


def test_completions_stream_and_not(client, eng):
    ids = eng.tokenize("The quick brown fox")
    want, _ = greedy(eng, ids, 6)
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text == want
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)  # token ids
    assert r.choices[0].text == want
    r = client.completions.create(model="tiny", prompt="The quick brown fox", temperature=0)
    assert r.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_and_seed(client, eng):
    full, _, _ = chat_expect(eng, MSGS, 12)
    stop = full[3:5]
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=1.0, seed=7)
    b = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["queued"] == 0


# ----------------------------------------------------------------------------- errors (raw HTTP)


def post(server, path, body, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=data, headers=h, timeout=30)


def assert_error(r, status, param=None, code=None, needle=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if needle is not None:
        assert needle in err["message"], err


@pytest.mark.parametrize("body,param,needle", [
    ({"model": "m"}, "messages", "required"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": "hi"}, "messages", "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages", "alternate"),
    ({"messages": MSGS, "n": 2}, "n", "n=1"),
    ({"messages": MSGS, "temperature": -1}, "temperature", "temperature"),
    ({"messages": MSGS, "temperature": "hot"}, "temperature", "number"),
    ({"messages": MSGS, "top_p": 0}, "top_p", "top_p"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"messages": MSGS, "max_tokens": 1.5}, "max_tokens", "integer"),
    ({"messages": MSGS, "stop": 3}, "stop", "stop"),
    ({"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": MSGS, "seed": "x"}, "seed", "integer"),
    ({"messages": MSGS, "stream": "yes"}, "stream", "boolean"),
    ({"messages": MSGS, "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": MSGS, "logprobs": True}, "logprobs", "logprobs"),
    ({"messages": MSGS, "max_tokens": CAP}, "max_tokens", "maximum context length"),
    ({"messages": [{"role": "user", "content": "Hello world " * 600}]}, "messages", "maximum context length"),
])
def test_bad_chat_requests_get_400(server, body, param, needle):
    assert_error(post(server, "/v1/chat/completions", body), 400, param=param, needle=needle)


def test_bad_bodies(server):
    assert_error(post(server, "/v1/chat/completions", None, raw=b"{not json"), 400, code="invalid_json")
    assert_error(post(server, "/v1/chat/completions", None, raw=b"[1, 2]"), 400, code="invalid_json")
    assert_error(post(server, "/v1/chat/completions", None, raw=b"\xff\xfe"), 400, code="invalid_json")
    assert_error(post(server, "/v1/completions", {"prompt": [[1, 2], [3]]}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"prompt": [10 ** 6]}), 400, param="prompt")
    assert_error(post(server, "/v1/completions", {"prompt": "x", "echo": True}), 400, param="echo")
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    assert_error(post(server, "/v1/chat/completions", None, raw=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(20):
            yield b"x" * 8192

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert_error(r, 413, code="request_too_large")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert_error(httpx.get(server.url + "/v1/models/other"), 404, code="model_not_found")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still serving


def test_api_key(eng):
    with BackgroundServer(create_app(eng, api_key=KEY, model_name="tiny")) as srv:
        assert_error(post(srv, "/v1/chat/completions", {"messages": MSGS}), 401, code="invalid_api_key")
        assert_error(post(srv, "/v1/chat/completions", {"messages": MSGS}, headers={"Authorization": "Bearer no"}),
                     401)
        assert_error(httpx.get(srv.url + "/v1/models"), 401)
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        r = good.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert httpx.get(srv.url + "/health").status_code == 200  # health and the page stay open


# ----------------------------------------------------------------------------- queue, cancel


def wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


LONG = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 1000, "temperature": 0,
        "stream": True}


def test_disconnect_cancels_stream(server):
    sched = server.app.state.scheduler
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=LONG) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
    t0 = time.monotonic()
    wait_for(lambda: sched.recent and sched.recent[-1][1] == "cancelled" and not sched.stats()["running"])
    assert time.monotonic() - t0 < 2.0
    assert sched.recent[-1][2] < 1000


def test_disconnect_cancels_non_stream(server):
    sched = server.app.state.scheduler
    n = sched.completed
    body = json.dumps({**LONG, "stream": False}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: sched.stats()["running"])
    time.sleep(0.05)
    s.close()
    wait_for(lambda: sched.completed > n)
    assert sched.recent[-1][1] == "cancelled" and sched.recent[-1][2] < 1000


def test_queue_limit_gives_429_and_fifo(eng):
    app = create_app(eng, max_queue=1)
    sched = app.state.scheduler
    with BackgroundServer(app) as srv, httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=LONG) as r:
            lines = r.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)  # the long one is running
            results = {}

            def queued():
                results["b"] = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})

            t = threading.Thread(target=queued)
            t.start()
            wait_for(lambda: sched.stats()["queued"] == 1)
            r3 = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
            assert_error(r3, 429, code="queue_full")
            assert r3.headers.get("retry-after") == "1"
        t.join(30)  # leaving the stream cancelled the long one; the queued one then ran
        assert results["b"].status_code == 200 and results["b"].json()["usage"]["completion_tokens"] == 2
        assert [x[1] for x in list(sched.recent)[-2:]] == ["cancelled", "max_new_tokens"]


# ----------------------------------------------------------------------------- load


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for memory use")
def test_50_concurrent_requests(server, client, eng):
    sched = server.app.state.scheduler
    prompts = [f"Hello world {i}" for i in range(5)]
    want = {p: chat_expect(eng, [{"role": "user", "content": p}], 4)[0] for p in prompts}

    def one(i):
        p = prompts[i % len(prompts)]
        if i % 2:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=4,
                                               temperature=0)
            return p, r.choices[0].message.content
        s = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=4,
                                           temperature=0, stream=True)
        return p, "".join(c.choices[0].delta.content or "" for c in s if c.choices)

    def round_():
        with ThreadPoolExecutor(50) as ex:
            return list(ex.map(one, range(50)))

    for p, text in round_():  # warm-up round (thread pools, allocator)
        assert text == want[p]
    gc.collect()
    before = rss_bytes()
    done0 = sched.completed
    results = round_()
    assert len(results) == 50 and all(text == want[p] for p, text in results)
    wait_for(lambda: sched.completed - done0 == 50 and not sched.stats()["running"])
    gc.collect()
    st = sched.stats()
    assert st["queued"] == 0 and st["idle_sessions"] <= sched.pool_size
    assert st["live_sessions"] <= sched.pool_size  # no leaked sessions
    grown = rss_bytes() - before
    assert grown < 32 * 2 ** 20, f"memory grew by {grown / 2 ** 20:.1f} MiB over 50 requests"


# ----------------------------------------------------------------------------- the command


def test_edgelm_serve_command(tmp_path):
    import signal
    import subprocess

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "--model", str(tiny_bundle()), "--port", "0",
                             "--max-tokens", "256", "--api-key", KEY, "--log-level", "warning"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving \S+ on (http://127\.0\.0\.1:(\d+))", line)
        assert m, line
        url = m.group(1)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        # greedy, so the tiny random model cannot sample a stop token first (it did once in CI at temperature 1)
        r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()


def test_edgelm_serve_bad_port_is_one_line():
    from conftest import assert_clean_error, run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("serve", "--model", tiny_bundle(), "--port", port, "--max-tokens", "256", timeout=60)
    assert_clean_error(proc, "cannot listen")


def test_scheduler_is_fifo_and_skips_cancelled_jobs(eng):
    import asyncio

    from edgelm.runtime.sampler import SamplerConfig
    from edgelm.server.scheduler import Job, QueueFull, Scheduler

    loop = asyncio.new_event_loop()  # never run: events just pile up in it
    sched = Scheduler(eng, max_queue=8)
    try:
        ids = eng.tokenize("Hello world")
        greedy_cfg = SamplerConfig(temperature=0.0)
        jobs = [Job(ids=ids, sampler=greedy_cfg, max_new_tokens=n, stop=[], loop=loop) for n in (300, 3, 4, 5, 6)]
        for j in jobs:
            sched.submit(j)
        jobs[3].cancel.set()  # its client left while it waited
        wait_for(lambda: sched.completed == 5)
        assert [r[0] for r in sched.recent] == [j.id for j in jobs]
        assert [r[1:] for r in sched.recent][1:] == [("max_new_tokens", 3), ("max_new_tokens", 4), ("cancelled", 0),
                                                    ("max_new_tokens", 6)]
        solo = Scheduler(eng, max_queue=0)  # no waiting at all: one request at a time
        try:
            long = Job(ids=ids, sampler=greedy_cfg, max_new_tokens=900, stop=[], loop=loop)
            solo.submit(long)
            wait_for(lambda: solo.stats()["running"])
            with pytest.raises(QueueFull):
                solo.submit(Job(ids=ids, sampler=greedy_cfg, max_new_tokens=1, stop=[], loop=loop))
            long.cancel.set()
            wait_for(lambda: solo.completed == 1)
            solo.submit(Job(ids=ids, sampler=greedy_cfg, max_new_tokens=1, stop=[], loop=loop))
            wait_for(lambda: solo.completed == 2)
        finally:
            solo.stop()
    finally:
        sched.stop()
        loop.close()
