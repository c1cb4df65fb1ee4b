"""Content parts: what a prompt or a chat message is made of.

A prompt is a string, a list of token ids, or a list of parts:
- `Text(text)` (a plain `str` in a list means the same);
- `Embeddings(values, token_id)`: soft tokens, rows of the model's input embedding space
  ([m, hidden] float32) that enter the model in place of m placeholder tokens `token_id`,
  as a multimodal tower's output does (transformers merges image and audio features the
  same way);
- `Image(source)` and `Audio(source)`: typed slots for the towers' inputs. A bundle without
  the tower answers them with a BadInputError naming the part.

`resolve(engine, parts, add_bos)` turns parts into token ids plus the soft rows to splice,
as `models.*.forward(..., embeds=...)` takes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError
from ..models._inputs import SoftRows


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Embeddings:
    values: np.ndarray = field(repr=False)  # [m, hidden] float32
    token_id: int = 0  # the placeholder id the rows replace (it stays in the token history)


@dataclass(frozen=True)
class Image:
    source: str | os.PathLike | bytes = field(repr=False)


@dataclass(frozen=True)
class Audio:
    source: str | os.PathLike | bytes = field(repr=False)


Part = Text | Embeddings | Image | Audio


def is_parts(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, Text, Embeddings, Image, Audio))
                                                      for p in prompt)


def resolve(engine, parts, add_bos: bool) -> tuple[list[int], SoftRows | None]:
    """Token ids for `parts`, and the soft rows (positions relative to those ids) to splice."""
    ids: list[int] = [engine.tokenizer.bos_id] if add_bos and engine.tokenizer.bos_id is not None else []
    rows: list[int] = []
    values: list[np.ndarray] = []
    hidden = int(engine.config.hidden_size)
    for i, p in enumerate(parts):
        if isinstance(p, str):
            p = Text(p)
        if isinstance(p, Text):
            if not isinstance(p.text, str):
                raise BadInputError(f"content part {i}: text must be a string")
            ids += engine.tokenize(p.text, add_bos=False)
        elif isinstance(p, Embeddings):
            v = np.asarray(p.values)
            if v.ndim != 2 or v.shape[1] != hidden or v.shape[0] < 1:
                raise BadInputError(f"content part {i}: embeddings must be [m, {hidden}] (m >= 1), got {list(v.shape)}")
            if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all():
                raise BadInputError(f"content part {i}: embeddings must be finite floats")
            tok = engine.check_ids([p.token_id])[0]
            rows += range(len(ids), len(ids) + v.shape[0])
            ids += [tok] * v.shape[0]
            values.append(v.astype(np.float32, copy=False))
        elif isinstance(p, (Image, Audio)):
            kind = "image" if isinstance(p, Image) else "audio"
            raise BadInputError(f"content part {i}: this bundle ({engine.path.name}) has no {kind} encoder, "
                                f"so it takes text only")
        else:
            raise BadInputError(f"content part {i}: expected text, Embeddings, Image or Audio, got {type(p).__name__}")
    if not rows:
        return ids, None
    return ids, SoftRows(np.asarray(rows, np.int64), np.concatenate(values, axis=0))
