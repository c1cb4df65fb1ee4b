"""Perplexity and KL divergence over a text, the way llama.cpp's llama-perplexity does it,
so the numbers are comparable side by side:

1. Tokenize the whole text once, with BOS in front. Special-token literals in the text
   (wikitext-2 has `<unk>` 15k times) are read as ordinary text, as llama.cpp does.
2. Cut it into consecutive chunks of `ctx` tokens and drop the ragged tail. Each chunk
   is scored independently, from an empty cache, with its first token replaced by BOS.
3. Score only the second half of each chunk: the logits at position j (ctx/2 <= j < ctx-1)
   predict token j+1. Every scored token therefore has at least ctx/2 tokens of context.
4. PPL = exp(mean NLL) over all scored tokens. Its standard error comes from the NLL
   spread (delta method).

With a base model (`kl_base`), the same positions also give the mean KL(base || model)
and the percentage of positions where the two models' top-1 tokens agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BadInputError


@dataclass
class PplResult:
    ppl: float
    ppl_stderr: float
    nll_mean: float
    tokens_scored: int
    chunks: int
    ctx: int
    seconds: float
    kl_mean: float | None = None
    kl_stderr: float | None = None
    top1_agree: float | None = None  # fraction, 0..1

    def to_dict(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def make_chunks(ids: list[int], ctx: int, bos: int, max_chunks: int | None = None) -> list[list[int]]:
    if ctx < 4:
        raise BadInputError(f"--ctx must be at least 4, got {ctx}")
    n = len(ids) // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise BadInputError(f"--max-chunks must be positive, got {max_chunks}")
        n = min(n, max_chunks)
    if n == 0:
        raise BadInputError(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    chunks = []
    for i in range(n):
        c = list(ids[i * ctx:(i + 1) * ctx])
        c[0] = bos
        chunks.append(c)
    return chunks


def perplexity(engine, text: str, ctx: int = 512, max_chunks: int | None = None, kl_base=None,
               progress: bool = True) -> PplResult:
    """`engine` and the optional `kl_base` engine need max_tokens >= ctx."""
    return perplexity_many({"model": engine}, text, ctx, max_chunks, kl_base, progress)["model"]


def perplexity_many(engines: dict, text: str, ctx: int = 512, max_chunks: int | None = None, kl_base=None,
                    progress: bool = True) -> dict[str, PplResult]:
    """Score several engines (same tokenizer) on the same chunks; the base model's logits
    are computed once per chunk and shared by every KL comparison."""
    if not engines:
        raise BadInputError("no models to evaluate")
    for e in (*engines.values(), kl_base):
        if e is not None and e.max_tokens < ctx:
            raise BadInputError(f"the engine's capacity {e.max_tokens} is below --ctx {ctx}")
    first_eng = next(iter(engines.values()))
    for e in (*engines.values(), kl_base):
        if e is not None and e.config.vocab_size != first_eng.config.vocab_size:
            raise BadInputError("every model (and --kl-base) must share one vocabulary")
    ids = first_eng.tokenize(text, add_bos=True, parse_special=False)  # llama-perplexity's tokenization
    chunks = make_chunks(ids, ctx, first_eng.tokenizer.bos_id, max_chunks)
    first = ctx // 2
    acc = {name: {"nll": [], "kl": [], "agree": [], "seconds": 0.0} for name in engines}
    it = chunks
    if progress:
        from tqdm import tqdm

        it = tqdm(chunks, desc="perplexity", unit="chunk", leave=False)
    for c in it:
        targets = np.asarray(c[first + 1:], dtype=np.int64)  # predicted by positions first..ctx-2
        lb = _log_softmax(kl_base.score(c, start=first)[:-1]) if kl_base is not None else None
        for name, eng in engines.items():
            t0 = time.perf_counter()
            lp = _log_softmax(eng.score(c, start=first)[:-1])  # [ctx - first - 1, vocab]
            a = acc[name]
            a["seconds"] += time.perf_counter() - t0
            a["nll"].append(-lp[np.arange(len(targets)), targets])
            if lb is not None:
                a["kl"].append((np.exp(lb) * (lb - lp)).sum(axis=1))
                a["agree"].append(lb.argmax(axis=1) == lp.argmax(axis=1))
        if progress and len(engines) == 1:
            it.set_postfix(ppl=f"{math.exp(np.concatenate(acc[next(iter(acc))]['nll']).mean()):.3f}")
    out = {}
    for name, a in acc.items():
        nll = np.concatenate(a["nll"])
        n = nll.size
        mean = float(nll.mean())
        ppl = math.exp(mean)
        res = PplResult(
            ppl=ppl,
            ppl_stderr=ppl * float(nll.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0,
            nll_mean=mean,
            tokens_scored=n,
            chunks=len(chunks),
            ctx=ctx,
            seconds=a["seconds"],
        )
        if a["kl"]:
            kl = np.concatenate(a["kl"])
            res.kl_mean = float(kl.mean())
            res.kl_stderr = float(kl.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
            res.top1_agree = float(np.concatenate(a["agree"]).mean())
        out[name] = res
    return out
