"""Aggregate decode of concurrent streams through the HTTP servers: edgelm (`--parallel N`)
against llama.cpp's llama-server (`--parallel N`, same threads), alternating rounds, the
same prompts to both. Needs `python benchmarks/peers.py setup llama` (it builds
llama-server and the Q8_0/Q4_0 files).

    python benchmarks/serve_parallel.py [--streams 8] [--tokens 64] [-r 3] [--pair Q8_0=int8-b32]

Prints, per round, each server's generated tokens per second summed over the streams, and
the median (min-max) of the per-round ratios edgelm / llama-server; also each server's
throughput with one stream, for the batching gain.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aggregate(url: str, prompts: list[str], tokens: int) -> tuple[float, int]:
    import httpx

    def one(p: str) -> int:
        body = {"prompt": p, "max_tokens": tokens, "temperature": 0, "stream": False}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as ex:
        done = sum(ex.map(one, prompts))
    return done / (time.perf_counter() - t0), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--pair", default="Q8_0=int8-b32", help="LLAMA_TYPE=EDGELM_SCHEME")
    a = ap.parse_args()
    qt, scheme = a.pair.split("=")

    import httpx

    from edgelm import Engine
    from edgelm.convert import convert, load_source
    from edgelm.server import BackgroundServer, create_app

    gguf = peers.llama_gguf(qt)
    server_bin = peers.llama_bin("llama-server")
    if not gguf.exists() or not server_bin.exists():
        sys.exit("run `python benchmarks/peers.py setup llama` first")
    bundle = peers.peers_dir() / "edgelm" / f"gemma3-270m.{scheme}.edgelm"
    if not bundle.exists():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        convert(load_source(peers.source_gguf()), bundle, scheme=scheme, progress=False)
    prompts = [f"Story number {i}: once upon a time, in a small village by the sea," for i in range(a.streams)]

    port = free_port()
    ctx = 1024 * a.streams
    llama = subprocess.Popen([str(server_bin), "-m", str(gguf), "-t", str(a.threads), "-tb", str(a.threads),
                              "--parallel", str(a.streams), "-c", str(ctx), "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lurl = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(lurl + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        eng = Engine(bundle, threads=a.threads, max_tokens=1024)
        with BackgroundServer(create_app(eng, model_name="m", parallel=a.streams, max_queue=64)) as srv:
            aggregate(srv.url, prompts[:2], 8), aggregate(lurl, prompts[:2], 8)  # warm up
            one = {"edgelm": aggregate(srv.url, prompts[:1], a.tokens)[0], "llama": aggregate(lurl, prompts[:1], a.tokens)[0]}
            ratios = []
            for r in range(a.rounds):
                order = (("edgelm", srv.url), ("llama", lurl)) if r % 2 == 0 else (("llama", lurl), ("edgelm", srv.url))
                got = {name: aggregate(url, prompts, a.tokens) for name, url in order}
                ratios.append(got["edgelm"][0] / got["llama"][0])
                print(f"round {r + 1}: {a.streams} streams: edgelm {got['edgelm'][0]:6.1f} tok/s "
                      f"({got['edgelm'][1]} tokens), llama-server {got['llama'][0]:6.1f} tok/s ({got['llama'][1]} tokens)",
                      flush=True)
        print(f"one stream: edgelm {one['edgelm']:.1f} tok/s, llama-server {one['llama']:.1f} tok/s")
        print(f"{a.streams} concurrent streams, {scheme} against {qt}, {a.threads} threads ({eng.ops.isa} build): "
              f"edgelm / llama-server aggregate {np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    finally:
        peers.stop(llama)


if __name__ == "__main__":
    main()
