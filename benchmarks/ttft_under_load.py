"""TTFT of a short request arriving while other requests decode, against the same request on
an idle server (`edgelm serve --parallel N`), measured at the client (first streamed token).

    python benchmarks/ttft_under_load.py [BUNDLE] [--parallel 8] [--busy 7] [--prompt-tokens 64] [-n 10]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--busy", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("-n", "--requests", type=int, default=10)
    a = ap.parse_args()

    import httpx

    from edgelm import Engine
    from edgelm.server import BackgroundServer, create_app

    eng = Engine(a.bundle, max_tokens=2048)
    base = [int(t) for t in eng.tokenize("The quick brown fox jumps over the lazy dog. " * 40, add_bos=True)]

    def ttft(url: str, i: int) -> float:
        prompt = base[:a.prompt_tokens - 1] + [base[1 + i]]  # a new last token: no full-prompt cache hit
        t0 = time.perf_counter()
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return time.perf_counter() - t0
        raise RuntimeError("no token")

    with BackgroundServer(create_app(eng, model_name="m", parallel=a.parallel, max_queue=64)) as srv:
        ttft(srv.url, 0)
        idle = [ttft(srv.url, i) for i in range(a.requests)]
        stop = threading.Event()

        def busy(k: int) -> None:
            while not stop.is_set():
                body = {"prompt": f"Story {k}: once upon a time", "max_tokens": 400, "temperature": 0.8,
                        "stream": True}
                with httpx.Client(timeout=300) as c, c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            break

        threads = [threading.Thread(target=busy, args=(k,)) for k in range(a.busy)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        loaded = [ttft(srv.url, i) for i in range(a.requests)]
        stop.set()
        for t in threads:
            t.join(60)
    p95 = lambda xs: float(np.percentile(xs, 95))  # noqa: E731
    print(f"idle TTFT p50 {np.median(idle) * 1e3:.0f} ms p95 {p95(idle) * 1e3:.0f} ms; with {a.busy} streams "
          f"decoding: p50 {np.median(loaded) * 1e3:.0f} ms p95 {p95(loaded) * 1e3:.0f} ms; p95 ratio "
          f"{p95(loaded) / p95(idle):.2f} ({eng.path.name}, parallel {a.parallel}, {a.prompt_tokens}-token prompts)")


if __name__ == "__main__":
    main()
