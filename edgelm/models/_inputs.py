"""Model inputs besides token ids: soft embedding rows spliced in at given positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SoftRows:
    """`values[j]` replaces the scaled token embedding of chunk row `rows[j]` (0-based within
    the ids passed to forward). rows: int64 [m], values: float32 [m, hidden]."""

    rows: np.ndarray
    values: np.ndarray

    def window(self, start: int, stop: int) -> "SoftRows | None":
        """The rows that fall in [start, stop), renumbered from start (for chunked prefill)."""
        keep = (self.rows >= start) & (self.rows < stop)
        if not keep.any():
            return None
        return SoftRows(self.rows[keep] - start, self.values[keep])


def splice(ops, x, embeds: SoftRows | None):
    """x [n, hidden] (a fresh backend array the caller owns) with the soft rows written in."""
    return x if embeds is None else ops.splice(x, embeds.rows, embeds.values)
