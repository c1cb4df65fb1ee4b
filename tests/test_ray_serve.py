"""Scale-out on Ray Serve (edgelm/server/ray_serve.py): a local Ray, 2 shards of the tiny model
behind Ray Serve's HTTP proxy on 127.0.0.1, driven over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from edgelm.runtime.engine import Engine  # noqa: E402
from edgelm.server.ray_serve import affinity_key, build_app, pick_shard  # noqa: E402

from .tiny_bundle import tiny_bundle  # noqa: E402

KEY = "sk-ray-test"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def cluster():
    b = tiny_bundle()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(b, shards=2, engine_kw={"threads": 1, "max_tokens": 256}, app_kw={"parallel": 2, "api_key": KEY},
                    shard_options={"ray_actor_options": {"num_cpus": 0}})
    serve.run(app, name="edgelm", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"})
    try:
        yield b, client
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()


def _chat(client, system: str, user: str = "hello", **kw):
    body = {"model": "chat", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0} | kw
    return client.post("/v1/chat/completions", json=body)


def test_affinity_keys_and_rendezvous_hashing():
    chat = json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]}).encode()
    longer = json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]}).encode()
    # a conversation keeps its key as it grows: its turns go where its history is
    assert affinity_key("/v1/chat/completions", chat) == affinity_key("/v1/chat/completions", longer)
    p = json.dumps({"prompt": "x" * 2000 + "tail"}).encode()
    assert affinity_key("/v1/completions", p) == "x" * 512
    assert affinity_key("/v1/models", b"") is None and affinity_key("/v1/completions", b"{bad") is None
    keys = [f"system prompt {i}" for i in range(200)]
    two = [pick_shard(k, 2) for k in keys]
    three = [pick_shard(k, 3) for k in keys]
    assert 60 < sum(two) < 140  # spread over both shards
    # adding a shard moves only the keys that go to it
    assert all(t == 2 or t == o for o, t in zip(two, three))


def test_serve_ray_bad_options_and_a_missing_extra_are_one_line(tmp_path):
    from .conftest import run_cli

    r = run_cli("serve", "--ray", "--model", tiny_bundle(), "--ray-autoscaling", "{bad")
    assert r.returncode == 2 and "--ray-autoscaling is not JSON" in r.stderr and "Traceback" not in r.stderr
    shim = tmp_path / "shim" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    r = run_cli("serve", "--ray", "--model", tiny_bundle(), env={"PYTHONPATH": str(shim.parent)})
    assert r.returncode == 2 and "edgelm[ray]" in r.stderr and "Traceback" not in r.stderr


def test_requests_through_the_proxy_answer_as_one_engine_does(cluster):
    b, client = cluster
    ref = Engine(b, max_tokens=256)
    conv = ref.create_conversation(system="You are a pirate.", sampler={"temperature": 0.0}, max_new_tokens=4)
    want = conv.send("hello")
    r = _chat(client, "You are a pirate.")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.headers["x-edgelm-shard"] in ("0", "1")
    assert client.get("/v1/models").json()["data"][0]["id"] == "chat"
    # the shards check the API key
    assert httpx.post(f"{client.base_url}/v1/chat/completions", json={"messages": []}, timeout=60).status_code == 401


def test_a_conversation_stays_on_its_shard_and_conversations_spread(cluster):
    """Every turn of a conversation (same system prompt and first message) meets the shard
    whose session pool holds its history; different conversations spread over the shards."""
    _, client = cluster
    seen = {}
    for i in range(8):
        system, first = "You are a helpful assistant.", f"question number {i}"
        turns = [{"role": "system", "content": system}, {"role": "user", "content": first}]
        shards = set()
        for reply in ("answer", "more"):
            r = client.post("/v1/chat/completions", json={"model": "chat", "messages": turns, "max_tokens": 3,
                                                           "temperature": 0})
            assert r.status_code == 200, r.text
            shards.add(r.headers["x-edgelm-shard"])
            turns = turns + [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
        assert len(shards) == 1
        seen[i] = shards.pop()
    assert set(seen.values()) == {"0", "1"}


def test_streaming_passes_through(cluster):
    _, client = cluster
    with client.stream("POST", "/v1/completions",
                       json={"model": "chat", "prompt": "a river", "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and len(lines) >= 3
    assert json.loads(lines[0][len("data: "):])["object"] == "text_completion"


def test_a_shard_that_dies_mid_stream_ends_with_a_clean_error_and_the_other_serves(cluster):
    _, client = cluster
    # a system prompt for each shard
    by_shard = {}
    for i in range(40):
        by_shard.setdefault(pick_shard(affinity_key("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "system", "content": f"victim {i}"}, {"role": "user", "content": "go"}]}).encode()),
            2), f"victim {i}")
    victim, survivor = by_shard[1], by_shard[0]
    body = {"model": "chat", "stream": True, "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "system", "content": victim}, {"role": "user", "content": "go"}]}
    lines, status = [], []

    def stream():
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            status.append(r.status_code)
            try:
                for ln in r.iter_lines():
                    if ln:
                        lines.append(ln)
            except httpx.HTTPError as e:  # a cut connection is a clean end too: no hang, no 500
                lines.append(f"transport: {type(e).__name__}")

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 60
    while not lines and time.time() < deadline:
        time.sleep(0.05)
    assert lines, "no first chunk"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "edgelm-shard-1" in a["name"]]
    assert names
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "edgelm-shard-1" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    t.join(120)
    assert not t.is_alive() and status == [200]
    assert lines[-1] != "data: [DONE]"
    assert lines[-1].startswith(("data: {\"error\"", "transport:")) or any(ln.startswith("event: error") for ln in lines)
    r = _chat(client, survivor, "go")  # the other shard keeps serving
    assert r.status_code == 200 and r.headers["x-edgelm-shard"] == "0"
    # the dead shard's keys get a clean answer: an error while it restarts, then service again
    deadline = time.time() + 120
    while time.time() < deadline:
        r = _chat(client, victim, "go")
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            break
        assert r.json()["error"]["type"] == "server_error"
        time.sleep(1)
    assert r.status_code == 200
