"""The server's /v1/embeddings (against transformers' hidden states), /tokenize,
/detokenize, /metrics (Prometheus text, counting what was served) and its per-generation
log line."""

from __future__ import annotations

import base64
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import tiny_bundle  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from edgelm import Engine  # noqa: E402
from edgelm.errors import BadInputError  # noqa: E402
from edgelm.server import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module")
def eng():
    e = Engine(tiny_bundle(), max_tokens=512)
    yield e
    e.close()


@pytest.fixture(scope="module")
def srv(eng):
    with BackgroundServer(create_app(eng, model_name="tiny")) as s:
        yield s


def _hf_hidden(ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    m = transformers.AutoModelForCausalLM.from_pretrained(tiny_bundle().parent / "chat-hf", torch_dtype=torch.float32)
    with torch.no_grad():
        out = m.model(torch.tensor([ids]))
    return out.last_hidden_state[0].numpy().astype(np.float64)


def test_engine_embeddings_match_transformers(eng):
    ids = eng.tokenize("Hello world, this is a test.", add_bos=True)
    ref = _hf_hidden(ids)
    mean = ref.mean(axis=0)
    got = eng.embeddings([ids], normalize=False)[0]
    np.testing.assert_allclose(got, mean, rtol=1e-3, atol=1e-3 * np.abs(mean).max())
    last = eng.embeddings(ids, pooling="last")[0]
    np.testing.assert_allclose(last, ref[-1] / np.linalg.norm(ref[-1]), atol=5e-4)  # (an fp16 KV cache)
    both = eng.embeddings(["Hello world, this is a test.", "Another one"])
    assert both.shape == (2, eng.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(both[0], got / np.linalg.norm(got), atol=1e-6)
    with pytest.raises(BadInputError, match="pooling"):
        eng.embeddings("x", pooling="max")
    with pytest.raises(BadInputError, match="non-empty"):
        eng.embeddings([])


def test_embeddings_endpoint(srv, eng):
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
    r = client.embeddings.create(model="tiny", input=["Hello world", "Goodbye"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == eng.config.hidden_size
    want = eng.embeddings(["Hello world", "Goodbye"])
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), want, atol=1e-6)
    n_tok = len(eng.tokenize("Hello world", add_bos=True)) + len(eng.tokenize("Goodbye", add_bos=True))
    assert r.usage.prompt_tokens == n_tok
    # base64 (the openai client's default when numpy is around decodes it itself)
    raw = httpx.post(srv.url + "/v1/embeddings", json={"input": "Hello world", "encoding_format": "base64",
                                                       "dimensions": 16}, timeout=60).json()
    v = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
    cut = eng.embeddings("Hello world", normalize=False)[0][:16]
    np.testing.assert_allclose(v, cut / np.linalg.norm(cut), atol=1e-6)
    ids = eng.tokenize("Hello world", add_bos=True)
    by_ids = httpx.post(srv.url + "/v1/embeddings", json={"input": ids, "pooling": "last"}, timeout=60).json()
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], eng.embeddings(ids, pooling="last")[0], atol=1e-6)


@pytest.mark.parametrize("body,param", [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input[0]"),
    ({"input": [[1, 10 ** 9]]}, "input[0]"),
    ({"input": [3.5]}, "input[0]"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "pooling": "max"}, "pooling"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": "x", "model": "other"}, "model"),
])
def test_embeddings_bad_input(srv, body, param):
    r = httpx.post(srv.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_tokenize_and_detokenize(srv, eng):
    text = "Hello world"
    r = httpx.post(srv.url + "/tokenize", json={"content": text}, timeout=30).json()
    assert r["tokens"] == eng.tokenize(text, add_bos=False)
    r2 = httpx.post(srv.url + "/tokenize", json={"content": text, "add_special": True, "with_pieces": True},
                    timeout=30).json()
    assert [t["id"] for t in r2["tokens"]] == eng.tokenize(text, add_bos=True)
    assert "".join(t["piece"] for t in r2["tokens"][1:]).replace("\u2581", " ") == text
    back = httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back["content"] == text
    for path, body, param in (("/tokenize", {"content": 3}, "content"), ("/tokenize", {"content": "x",
                              "with_pieces": "y"}, "with_pieces"), ("/detokenize", {"tokens": "1 2"}, "tokens"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens")):
        r = httpx.post(srv.url + path, json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (labels and "{" + labels) ) and not line.startswith("#"):
            if labels or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_what_was_served(eng, caplog):
    app = create_app(eng, model_name="tiny")
    with BackgroundServer(app) as s, caplog.at_level(logging.INFO, logger="edgelm.server"):
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="-", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "Hi there"}]
        r1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
        r2 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
        httpx.post(s.url + "/v1/chat/completions", json={"messages": []}, timeout=30)
        text = httpx.get(s.url + "/metrics", timeout=30).text
    assert _metric(text, "edgelm_requests_total", 'route="/v1/chat/completions",status="200"') == 2
    assert _metric(text, "edgelm_requests_total", 'route="/v1/chat/completions",status="400"') == 1
    gen = r1.usage.completion_tokens + r2.usage.completion_tokens
    assert _metric(text, "edgelm_generated_tokens_total") == gen
    assert _metric(text, "edgelm_prompt_tokens_total") == r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert _metric(text, "edgelm_prompt_cached_tokens_total") == r2.usage.prompt_tokens_details.cached_tokens > 0
    assert _metric(text, "edgelm_ttft_seconds_count") == 2
    assert "edgelm_queue_depth 0.0" in text and "edgelm_running 0.0" in text
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "edgelm.server"]
    assert any(line.startswith(r1.id) and "generated=" in line and "stop=" in line for line in lines), lines
