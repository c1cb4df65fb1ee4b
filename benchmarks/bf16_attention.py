"""What bf16 dot products in prefill attention cost in quality.

    python benchmarks/bf16_attention.py BUNDLE [--text FILE] [--chunks 16] [--ctx 512] [--native]

AVX-512 BF16 (`vdpbf16ps`) multiplies pairs of bf16 values into fp32 sums: twice the
multiply-adds of an fp32 FMA per instruction, at bf16's 8-bit mantissa. The native bf16
prefill attention (`Engine(attn_precision="bf16")`) rounds Q and K (the scores' inputs) and
the unnormalized probabilities and V (the P.V inputs) to bf16, and keeps the max, exp, sums
and outputs in fp32. By default this script simulates exactly that in numpy (round to nearest
even) inside the model's per-op path, so it runs on any CPU; with --native it runs the two
native paths themselves (a CPU with AVX512_BF16). Either way it scores wikitext-2 chunks the
way `edgelm eval ppl` does, against the same bundle with fp32 attention, both on the default
fp16 KV cache: perplexity, mean KL(fp32 attention || bf16 attention) and top-1 agreement.
Nothing here is part of edgelm's test suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelm.backends.base import OPS  # noqa: E402
from edgelm.backends.numpy_ops import attention_math, bf16_round  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "wikitext2_test.txt"


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
        return attention_math(*args, **kw, cast=bf16_round if self._round else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--text", default=str(TEXT))
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--native", action="store_true", help="the native kernels' two paths instead of the simulation")
    a = p.parse_args()
    from edgelm.eval.ppl import perplexity_many
    from edgelm.runtime.engine import Engine

    text = Path(a.text).read_text(encoding="utf-8")
    engines = {}
    if a.native:
        for name, prec in (("fp32 attention", "f32"), ("bf16 attention", "bf16")):
            engines[name] = Engine(a.bundle, threads=a.threads, max_tokens=a.ctx, attn_precision=prec)
        if engines["bf16 attention"].attn_precision != "bf16":
            raise SystemExit("--native: this CPU or build has no bf16 attention path (AVX512_BF16)")
    for name, rnd in (() if a.native else (("fp32 attention", False), ("bf16 attention", True))):
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
