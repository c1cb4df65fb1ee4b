"""Load test of `edgelm serve`: many clients, random disconnects, answers checked.

Starts `edgelm serve --deterministic --parallel P` as a child process (batch-invariant kernels:
a greedy request gives the same tokens alone or in any batch, so every answer can be checked
against the one the idle server gave). Then `--clients` threads send `--requests` requests
(chat and completions, streaming and not, over a few prompts) and drop about `--drop` of them
mid-answer (a streaming read closed after its first chunks, or a non-streaming request given
up after a short read timeout). Reports:

- every request not dropped answered 200 with exactly the idle server's text;
- no 5xx; 429s (a full queue) are counted, and retried after their Retry-After;
- the server's resident memory (VmRSS) after a warm-up (the idle answers, then two rounds of
  `--clients` concurrent requests, so that the batch's working set exists) and after the
  load: growth %, which is what the load leaves behind.

    python benchmarks/load_test.py [BUNDLE] [--requests 200] [--clients 32] [--parallel 8] [--drop 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

PROMPTS = [
    ("chat", "Write one sentence about rivers."),
    ("chat", "Name three colors."),
    ("chat", "What is two plus two?"),
    ("completion", "The capital of France is"),
    ("completion", "Once upon a time, in a small village,"),
    ("completion", "def fibonacci(n):"),
]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def _body(kind: str, text: str, max_tokens: int, stream: bool) -> tuple[str, dict]:
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                                        "temperature": 0, "stream": stream}
    return "/v1/completions", {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _text(kind: str, obj: dict) -> str:
    c = obj["choices"][0]
    return c["message"]["content"] if kind == "chat" else c["text"]


def _stream_text(kind: str, lines) -> tuple[str, bool]:
    out, done = [], False
    for ln in lines:
        if not ln.startswith("data: "):
            continue
        if ln == "data: [DONE]":
            done = True
            break
        c = json.loads(ln[6:])["choices"][0]
        out.append((c.get("delta") or {}).get("content") or "" if kind == "chat" else c.get("text") or "")
    return "".join(out), done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--drop", type=float, default=0.2, help="fraction of requests the client abandons mid-answer")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    a = ap.parse_args()

    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cmd = [sys.executable, "-m", "edgelm", "serve", "--port", str(port), "--parallel", str(a.parallel),
           "--deterministic", "--max-queue", str(a.clients * 2), "--log-level", "warning"]
    if a.bundle:
        cmd += ["--model", a.bundle]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    srv = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if srv.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start: {srv.stderr.read()[-2000:]}")
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        # the idle server's answers (and a warm-up of every path)
        want = {}
        with httpx.Client(base_url=url, timeout=300) as c:
            for kind, text in PROMPTS:
                path, body = _body(kind, text, a.max_tokens, False)
                want[text] = _text(kind, c.post(path, json=body | {"model": model}).json())
                path, body = _body(kind, text, a.max_tokens, True)
                with c.stream("POST", path, json=body | {"model": model}) as r:
                    got, _ = _stream_text(kind, r.iter_lines())
                assert got == want[text], (text, got, want[text])

            # a warm-up at full concurrency: the batch's sessions, KV pages and buffers are
            # allocated before the baseline, so the growth below is what the load leaves behind
            def warm(i: int) -> None:
                kind, text = PROMPTS[i % len(PROMPTS)]
                path, body = _body(kind, text, a.max_tokens, True)
                with httpx.Client(base_url=url, timeout=300) as wc, wc.stream("POST", path,
                                                                          json=body | {"model": model}) as r:
                    for _ in r.iter_lines():
                        pass

            for _ in range(2):
                ws = [threading.Thread(target=warm, args=(i,)) for i in range(a.clients)]
                for t in ws:
                    t.start()
                for t in ws:
                    t.join()
        rss0 = _rss_mib(srv.pid)

        rng = random.Random(a.seed)
        plan = [(rng.choice(PROMPTS), rng.random() < 0.5, rng.random() < a.drop) for _ in range(a.requests)]
        lock = threading.Lock()
        todo = list(range(a.requests))
        res = {"ok": 0, "wrong": [], "dropped": 0, "status": {}, "retried_429": 0, "errors": []}

        def client() -> None:
            with httpx.Client(base_url=url, timeout=300) as c:
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.pop()
                    (kind, text), stream, drop = plan[i]
                    path, body = _body(kind, text, a.max_tokens, stream)
                    body["model"] = model
                    while True:
                        try:
                            if stream:
                                with c.stream("POST", path, json=body) as r:
                                    if r.status_code == 429:
                                        pass
                                    elif drop:  # read a little, then hang up
                                        for n, _ in enumerate(r.iter_lines()):
                                            if n >= 2:
                                                break
                                        status, got = r.status_code, None
                                    else:
                                        got, done = _stream_text(kind, r.iter_lines())
                                        status = r.status_code if done else -1
                                    code = r.status_code
                            else:
                                r = c.post(path, json=body, timeout=0.05 if drop else 300)
                                code = status = r.status_code
                                got = _text(kind, r.json()) if r.status_code == 200 else None
                        except httpx.ReadTimeout:
                            code, status, got = 0, "dropped", None  # the client gave up: a disconnect
                        except httpx.HTTPError as e:
                            with lock:
                                res["errors"].append(f"{type(e).__name__}: {e}")
                            code, status, got = -2, "error", None
                        if code == 429:
                            with lock:
                                res["retried_429"] += 1
                            time.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        break
                    with lock:
                        res["status"][str(code)] = res["status"].get(str(code), 0) + 1
                        if drop:
                            res["dropped"] += 1
                        elif status == 200 and got == want[text]:
                            res["ok"] += 1
                        else:
                            res["wrong"].append({"prompt": text, "stream": stream, "status": status, "got": got})

        t0 = time.time()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        time.sleep(1.0)  # let the server finish the cancelled generations' last steps
        rss1 = _rss_mib(srv.pid)
        health = httpx.get(url + "/health", timeout=10).status_code
    finally:
        peers.stop(srv, 20)
    five = sum(v for k, v in res["status"].items() if k.startswith("5"))
    summary = {
        "bundle": a.bundle or "default", "requests": a.requests, "clients": a.clients, "parallel": a.parallel,
        "answered_correctly": res["ok"], "dropped_by_client": res["dropped"], "wrong": len(res["wrong"]),
        "status_counts": res["status"], "http_5xx": five, "retried_429": res["retried_429"],
        "client_errors": res["errors"][:5], "wall_s": round(wall, 1), "rss_after_warmup_mib": round(rss0, 1),
        "rss_after_load_mib": round(rss1, 1), "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "health_after": health, "host_cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=1))
    for w in res["wrong"][:5]:
        print("WRONG:", json.dumps(w)[:300])
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
    met = (not res["wrong"] and res["ok"] + res["dropped"] == a.requests and five == 0
           and summary["rss_growth_pct"] <= 5.0 and health == 200)
    print(f"targets (every kept request right, no 5xx, RSS growth <= 5%): {'met' if met else 'NOT met'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
