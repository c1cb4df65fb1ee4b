"""Prompt caching across requests: TTFT of a request whose long system prompt an earlier
request already sent, against the first one's, through the server (`timings.ttft_s`).

    python benchmarks/prefix_cache.py [BUNDLE] [--system-tokens 1000] [--parallel 1] [-r 3]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", default=None)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    a = ap.parse_args()

    import httpx

    from edgelm import Engine
    from edgelm.server import BackgroundServer, create_app

    eng = Engine(a.bundle, max_tokens=a.system_tokens + 256)
    words = ("The committee reviewed the annual report on coastal erosion and its budget. " * 400).split()
    system = " ".join(words)
    while len(eng.tokenize(system)) > a.system_tokens:
        words = words[:int(len(words) * 0.95)]
        system = " ".join(words)
    ratios = []
    for r in range(a.rounds):
        with BackgroundServer(create_app(eng, model_name="m", parallel=a.parallel)) as srv:
            def ask(q):
                body = {"messages": [{"role": "system", "content": system + f" (round {r})"},
                                     {"role": "user", "content": q}], "max_tokens": 1, "temperature": 0}
                return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=300).json()
            first = ask("Summarize the report.")
            second = ask("What was the budget?")
        t1, t2 = first["timings"]["ttft_s"], second["timings"]["ttft_s"]
        ratios.append(t2 / t1)
        print(f"round {r + 1}: first TTFT {t1:.3f} s ({first['usage']['prompt_tokens']} prompt tokens), "
              f"second {t2:.3f} s ({second['usage']['prompt_tokens_details']['cached_tokens']} cached)", flush=True)
    print(f"{eng.path.name}: second / first TTFT with a {a.system_tokens}-token shared system prompt: "
          f"{np.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
