"""Sampling: a validated frozen config plus small composable steps. The seeded RNG lives
in the session, so the same seed gives the same tokens."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError, EdgelmError


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    # Penalties (all off by default). presence/frequency follow OpenAI: subtracted from the
    # logit of every token already generated in this request (presence once, frequency per
    # occurrence). repetition_penalty is llama.cpp's multiplicative one over the last
    # `penalty_last_n` tokens of the context (prompt included): a positive logit is divided
    # by it, a negative one multiplied.
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    penalty_last_n: int = 64  # window of the repetition penalty; 0 = the whole context

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise BadInputError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadInputError(f"top_k must be an integer >= 0, got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0 < p <= 1):
            raise BadInputError(f"top_p must be in (0, 1], got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise BadInputError(f"seed must be a non-negative integer, got {self.seed!r}")
        r = self.repetition_penalty
        if not _is_num(r) or not math.isfinite(r) or r <= 0:
            raise BadInputError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(v) or not -2.0 <= v <= 2.0:
                raise BadInputError(f"{name} must be a number in [-2, 2], got {v!r}")
        n = self.penalty_last_n
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise BadInputError(f"penalty_last_n must be an integer >= 0 (0 = whole context), got {n!r}")

    def override(self, **fields) -> "SamplerConfig":
        """A copy with the given fields replaced; None leaves a field as it is (CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in fields.items() if v is not None})

    @classmethod
    def coerce(cls, value) -> "SamplerConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - FIELDS
            if unknown:
                raise BadInputError(f"unknown sampler fields {sorted(unknown)}")
            return cls(**value)
        raise BadInputError(f"sampler must be a SamplerConfig or dict, got {type(value).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes) -> "SamplerConfig":
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - FIELDS
        if unknown:
            raise BadInputError(f"unknown sampler fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


FIELDS = frozenset(f.name for f in dataclasses.fields(SamplerConfig))


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def apply_penalties(logits: np.ndarray, cfg: SamplerConfig, context=(), generated=()) -> np.ndarray:
    """Logits with the config's penalties applied (a new float64 array when any is on).

    context: every token of the sequence so far (prompt and generated); the repetition
    penalty looks at its last `penalty_last_n`. generated: the tokens generated in this
    request; presence and frequency penalties count these (OpenAI semantics)."""
    if not cfg.has_penalties:
        return logits
    out = np.array(logits, dtype=np.float64, copy=True)
    if cfg.repetition_penalty != 1.0 and len(context):
        recent = context[-cfg.penalty_last_n:] if cfg.penalty_last_n else context
        ids = np.unique(np.asarray(recent, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < out.shape[0])]
        v = out[ids]
        out[ids] = np.where(v > 0, v / cfg.repetition_penalty, v * cfg.repetition_penalty)
    if (cfg.presence_penalty or cfg.frequency_penalty) and len(generated):
        ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
        keep = (ids >= 0) & (ids < out.shape[0])
        ids, counts = ids[keep], counts[keep]
        out[ids] -= counts * cfg.frequency_penalty + cfg.presence_penalty
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits (all indices when k is 0 or >= vocab)."""
    if k <= 0 or k >= logits.shape[0]:
        return np.arange(logits.shape[0])
    return np.argpartition(logits, -k)[-k:]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Positions (into probs) of the smallest set whose mass reaches p, most likely first;
    every position (in index order) when p >= 1. Only the head of the distribution is
    sorted: the candidate set grows 8x at a time until it holds mass p, so a 262k-entry
    vocabulary costs a partition, not a full sort, per token."""
    n = probs.shape[0]
    if p >= 1.0:
        return np.arange(n)
    k = min(n, 64)
    while True:
        idx = np.argpartition(-probs, k - 1)[:k] if k < n else np.arange(n)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        cum = np.cumsum(probs[idx])
        if cum[-1] >= p or k == n:
            keep = min(int(np.searchsorted(cum, p, side="left")) + 1, k)
            return idx[:keep]
        k = min(n, k * 8)


def sample(logits: np.ndarray, cfg: SamplerConfig, rng, context=(), generated=()) -> int:
    """One token id. `context`/`generated` feed the penalties (see apply_penalties).
    `rng` may be a callable returning the generator (made on first need: greedy decoding
    never imports numpy.random)."""
    if cfg.greedy and not cfg.has_penalties:
        return int(np.argmax(logits))  # no float64 copy of the vocabulary per token
    logits = apply_penalties(np.asarray(logits, dtype=np.float64), cfg, context, generated)
    if cfg.greedy:
        return int(np.argmax(logits))
    if callable(rng):
        rng = rng()
    n = logits.shape[0]
    # The whole vocabulary (top_k off) is used in place, not gathered through an index
    # array: with 262k entries each avoided pass is ~0.3-1.5 ms a token.
    idx = top_k_filter(logits, cfg.top_k) if 0 < cfg.top_k < n else None
    y = np.divide(logits if idx is None else logits[idx], cfg.temperature)  # a fresh array we own
    y -= y.max()
    live = _live(y) if idx is None else None
    if live is None:
        np.exp(y, out=y)
    else:  # the same values, bit for bit: exp is exactly 0 below _EXP_ZERO
        v = np.exp(y[live])
        y.fill(0.0)
        y[live] = v
    y /= y.sum()  # softmax
    keep = top_p_filter(y, cfg.top_p) if cfg.top_p < 1.0 else None
    probs = y if keep is None else y[keep]
    total = probs.sum()
    if not (np.isfinite(total) and total > 0):
        raise EdgelmError("the model produced non-finite logits (NaN or inf), so nothing can be sampled; "
                          "the bundle's weights or config are likely corrupt")
    probs /= total
    # numpy's Generator.choice(len(p), p=p) without its O(n) argument checks: the same
    # inverse-CDF draw from one rng.random(), so a seed gives the same tokens
    if keep is None and live is not None:
        # Only the live entries: the zeros between them add exactly nothing to the running
        # sum, and the first cdf entry above the draw is always a live one.
        keep = live
        probs = probs[live]
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    j = int(cdf.searchsorted(rng.random(), side="right"))
    if keep is not None:
        j = int(keep[j])
    return j if idx is None else int(idx[j])


# exp(x) is exactly 0.0 in float64 for every x below this (the smallest subnormal is e^-744.4)
_EXP_ZERO = -746.0
_SPARSE_MIN = 4096  # a vocabulary this small is cheap either way


def _live(y: np.ndarray):
    """Where exp(y) can be non-zero, when that is under half of a large `y` (its maximum at 0),
    else None. Logits masked to -inf by constrained decoding are the case: numpy's exp takes a
    slow path for -inf (~4x a finite value's cost over 262k entries), and the cumulative sum
    of the draw would walk every zero. One min() pass is all it costs other logits."""
    if y.shape[0] < _SPARSE_MIN or not y.min() < _EXP_ZERO:
        return None
    live = y >= _EXP_ZERO
    return np.flatnonzero(live) if 2 * np.count_nonzero(live) < y.shape[0] else None


MAX_TOP_LOGPROBS = 20


def token_logprobs(logits: np.ndarray, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under softmax(logits) (the model's distribution at
    temperature 1, before penalties, masks and filters), and the `top` most likely tokens
    with theirs, most likely first."""
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m, dtype=np.float32).sum(dtype=np.float64)))
    head: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, x.shape[0])
        idx = np.argpartition(-x, k - 1)[:k] if k < x.shape[0] else np.arange(x.shape[0])
        idx = idx[np.lexsort((idx, -x[idx]))]  # most likely first, ties by id
        head = [(int(i), float(x[i]) - lse) for i in idx]
    return float(x[token]) - lse, head
