"""Sampling: a validated frozen config plus small composable steps. The seeded RNG lives
in the session, so the same seed gives the same tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

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

    @classmethod
    def coerce(cls, value) -> "SamplerConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"temperature", "top_k", "top_p", "seed"}
            if unknown:
                raise BadInputError(f"unknown sampler fields {sorted(unknown)}")
            return cls(**value)
        raise BadInputError(f"sampler must be a SamplerConfig or dict, got {type(value).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits (all indices when k is 0 or >= vocab)."""
    if k <= 0 or k >= logits.shape[0]:
        return np.arange(logits.shape[0])
    return np.argpartition(logits, -k)[-k:]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Positions (into probs) of the smallest set whose mass reaches p, most likely first."""
    order = np.argsort(-probs, kind="stable")
    if p >= 1.0:
        return order
    cum = np.cumsum(probs[order])
    keep = int(np.searchsorted(cum, p, side="left")) + 1
    return order[:keep]


def sample(logits: np.ndarray, cfg: SamplerConfig, rng: np.random.Generator) -> int:
    logits = np.asarray(logits, dtype=np.float64)
    if cfg.greedy:
        return int(np.argmax(logits))
    idx = top_k_filter(logits, cfg.top_k)
    probs = softmax(logits[idx] / cfg.temperature)
    keep = top_p_filter(probs, cfg.top_p)
    idx, probs = idx[keep], probs[keep]
    probs = probs / probs.sum()
    return int(idx[rng.choice(len(idx), p=probs)])
