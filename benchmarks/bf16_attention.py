"""What bf16 dot products in attention would cost in quality, before any kernel is written.

    python benchmarks/bf16_attention.py BUNDLE [--text FILE] [--chunks 16] [--ctx 512]

AVX-512 BF16 (`vdpbf16ps`) multiplies pairs of bf16 values into fp32 sums: twice the
multiply-adds of an fp32 FMA per instruction, at bf16's 8-bit mantissa. A prefill attention
built on it would round Q and K (the scores' inputs) and the unnormalized probabilities and V
(the P.V inputs) to bf16, and keep the max, exp, sums and outputs in fp32. This script
simulates exactly that in numpy (round to nearest even) inside the model's per-op path and
scores wikitext-2 chunks the way `edgelm eval ppl` does, against the same bundle with fp32
attention (the numpy reference's math, so both sides differ only in the rounding), both on
the default fp16 KV cache:
perplexity, mean KL(fp32 attention || bf16 attention) and top-1 agreement.
Nothing here is part of edgelm or its test suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelm.backends.base import OPS  # noqa: E402
from edgelm.backends.numpy_ops import attention_math  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"


def bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), as float32."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    b = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return b.view(np.float32)


class _Attention:
    """The engine's op table with its fused plans hidden (so every attention call is seen) and
    `attention` replaced by the reference's math, with bf16 rounding or without."""

    fused_plans = frozenset()
    device_logits = False

    def __init__(self, ops, round_bf16: bool):
        self._ops, self._round = ops, round_bf16
        self._allowed = frozenset(OPS) | {"name", "isa", "default_kv_dtype", "set_threads", "deterministic"}

    def __getattr__(self, attr):
        if attr.startswith("__") or attr not in self.__dict__.get("_allowed", ()):
            raise AttributeError(attr)
        return getattr(self._ops, attr)

    def attention(self, *args, **kw):
        return attention_math(*args, **kw, cast=bf16 if self._round else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--text", default=str(TEXT))
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from edgelm.eval.ppl import perplexity_many
    from edgelm.runtime.engine import Engine

    text = Path(a.text).read_text(encoding="utf-8")
    engines = {}
    for name, rnd in (("fp32 attention", False), ("bf16 attention", True)):
        class _Engine(Engine):  # each session gets the simulating op table (an Engine is frozen)
            def create_session(self, sampler=None, _rnd=rnd):
                s = super().create_session(sampler)
                s.ops = _Attention(s.ops, _rnd)
                return s
        engines[name] = _Engine(a.bundle, threads=a.threads, max_tokens=a.ctx)  # the default (fp16) KV cache
    base = engines["fp32 attention"]
    res = perplexity_many(engines, text, ctx=a.ctx, max_chunks=a.chunks, kl_base=base)
    for name, r in res.items():
        print(f"{name}: PPL {r.ppl:.3f} (+-{r.ppl_stderr:.3f}), KL vs fp32 attention {r.kl_mean:.4f} "
              f"(+-{r.kl_stderr:.4f}), top-1 agreement {100 * r.top1_agree:.2f}%, {r.tokens_scored} tokens")


if __name__ == "__main__":
    main()
