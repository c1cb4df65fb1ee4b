"""Session: owns the KV state of one sequence. Prefill runs in chunks; decode one token
at a time; generate() is a generator of text pieces followed by the final stats."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import BadInputError, CapacityError
from .sampler import SamplerConfig, sample

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    ttft_seconds: float
    stop_reason: str  # "stop_token", "max_new_tokens"

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes from prefill's logits; decode steps make the rest.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prefill_tok_s"] = self.prefill_tok_s
        d["decode_tok_s"] = self.decode_tok_s
        return d


class Session:
    def __init__(self, engine: "Engine", sampler: SamplerConfig):
        self.engine = engine
        self.sampler = sampler
        self.rng = np.random.default_rng(sampler.seed)
        self.caches = engine.model.make_caches(engine.config, engine.max_tokens, engine.prefill_chunk)
        self.tokens: list[int] = []  # every token whose K/V is in the cache
        self.last_stats: GenerationStats | None = None
        self.pending_token: int | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return self.engine.max_tokens

    def reset(self) -> None:
        for c in self.caches:
            c.truncate(0)
        self.tokens = []
        self.pending_token = None

    def _forward(self, ids: list[int], logits: str):
        eng = self.engine
        with eng.lock:
            out = eng.model.forward(eng.config, eng.weights, eng.ops, ids, len(self.tokens), self.caches, logits)
        self.tokens.extend(ids)
        return out

    def _check_fits(self, n_new: int, what: str) -> None:
        if len(self.tokens) + n_new > self.capacity:
            raise CapacityError(
                f"{what} needs {len(self.tokens) + n_new} tokens of context but the KV-cache capacity is "
                f"{self.capacity} ({len(self.tokens)} already used); raise max_tokens (--max-tokens) or shorten the request")

    def prefill(self, token_ids, return_logits: bool = False) -> np.ndarray:
        """Feed tokens in chunks. Returns the last token's logits [vocab], or with
        return_logits=True every position's logits [n, vocab]."""
        ids = self.engine.check_ids(token_ids)
        if not ids:
            raise BadInputError("prefill needs at least one token")
        self._check_fits(len(ids), "the prompt")
        chunk = self.engine.prefill_chunk
        outs = []
        last = None
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            final = s + chunk >= len(ids)
            mode = "all" if return_logits else ("last" if final else "none")
            out = self._forward(part, mode)
            if return_logits:
                outs.append(out)
            elif final:
                last = out
        return np.concatenate(outs, axis=0) if return_logits else last

    def decode_step(self, token_id: int) -> np.ndarray:
        """Feed one token; returns the logits [vocab] for the next position."""
        ids = self.engine.check_ids([token_id])
        self._check_fits(1, "decoding")
        return self._forward(ids, "last")

    def sample(self, logits: np.ndarray) -> int:
        return sample(logits, self.sampler, self.rng)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 256,
        stop_ids=None,
    ) -> Iterator["str | GenerationStats"]:
        """Yields text pieces as they decode, then one GenerationStats.

        The prompt continues the session's context (a fresh session starts with BOS)."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise BadInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        eng = self.engine
        if isinstance(prompt, str):
            ids = eng.tokenize(prompt, add_bos=eng.add_bos and not self.tokens)
        else:
            ids = eng.check_ids(prompt)
        if not ids:
            raise BadInputError("the prompt is empty")
        if self.pending_token is not None:  # the previous reply's last token
            ids = [self.pending_token] + ids
        self._check_fits(len(ids) + max_new_tokens, f"a {len(ids)}-token prompt plus {max_new_tokens} new tokens")
        stops = eng.stop_ids if stop_ids is None else frozenset(stop_ids)
        return self._generate(ids, max_new_tokens, stops)

    def _generate(self, ids, max_new_tokens, stops):
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        self.pending_token = None
        t_prefill = time.perf_counter() - t0
        decoder = self.engine.tokenizer.stream()
        generated = 0
        reason = "max_new_tokens"
        ttft = None
        t_dec = time.perf_counter()
        while True:
            tok = self.sample(logits)
            generated += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
            # The last sampled token is not in the cache; a continuing turn feeds it first.
            self.pending_token = tok
            if tok in stops:
                reason = "stop_token"
                break
            piece = decoder.feed(tok)
            if piece:
                yield piece
            if generated >= max_new_tokens:
                break
            logits = self.decode_step(tok)
            self.pending_token = None
        tail = decoder.flush()
        if tail:
            yield tail
        t_end = time.perf_counter()
        self.last_stats = GenerationStats(
            prompt_tokens=len(ids),
            generated_tokens=generated,
            prefill_seconds=t_prefill,
            decode_seconds=t_end - t_dec,
            ttft_seconds=ttft or 0.0,
            stop_reason=reason,
        )
        yield self.last_stats
