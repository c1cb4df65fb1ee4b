"""Content parts: what a prompt or a chat message is made of.

A prompt is a string, a list of token ids, or a list of parts:
- `Text(text)` (a plain `str` in a list means the same);
- `Embeddings(values, token_id)`: soft tokens, rows of the model's input embedding space
  ([m, hidden] float32) that enter the model in place of m placeholder tokens `token_id`,
  as a multimodal tower's output does (transformers merges image and audio features the
  same way);
- `Image(source)` and `Audio(source)`: an image or a recording (a path, the file's bytes or a
  data: URL). A Gemma 3n bundle that keeps the tower encodes it (runtime/media.py) and the
  prompt gets the processor's expansion around its soft rows; a bundle without the tower
  answers with a BadInputError naming the part;
- `Tokens(ids)`: token ids taken as they are (no BOS is added before a leading one, as
  `Session.generate` adds none to a list of ids), for callers that render and tokenize
  themselves, as Conversation does.
OpenAI / Hugging Face dicts ({"type": "text", "text": ...}, {"type": "image" | "image_url",
...}, {"type": "audio" | "input_audio", ...}) are read as the matching part (`from_dict`).

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
    source: str | os.PathLike | bytes = field(repr=False)  # a path, the file's bytes or a data: URL
    # the soft rows, once an engine with an image tower has encoded it (check_part does)
    encoded: tuple = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Audio:
    source: str | os.PathLike | bytes = field(repr=False)  # a path, the file's bytes or a data: URL
    # the soft rows, one Embeddings per clip of at most 30 s, once encoded (check_part does)
    encoded: tuple = field(default=(), compare=False, repr=False)


def media_kind(p) -> str:
    """The modality ("vision" / "audio") of an Image / Audio part."""
    return "vision" if isinstance(p, Image) else "audio"


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...] | list[int]


Part = Text | Embeddings | Image | Audio | Tokens
_PART_TYPES = (str, dict, Text, Embeddings, Image, Audio, Tokens)


def is_parts(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, _PART_TYPES) for p in prompt)


def from_dict(d: dict, where: str) -> Part:
    """An OpenAI / Hugging Face content part as a Part (an image or audio keeps its source as
    the dict gives it: a URL, path or data)."""
    kind = d.get("type")
    if kind == "text":
        if not isinstance(d.get("text"), str):
            raise BadInputError(f"{where}: a text part needs 'text', a string")
        return Text(d["text"])
    if kind in ("image", "image_url", "audio", "input_audio"):
        src = next((d[k] for k in (kind, "url", "path") if d.get(k) is not None), None)
        if isinstance(src, dict):  # OpenAI: {"image_url": {"url": ...}}, {"input_audio": {"data": ...}}
            src = src.get("url", src.get("data"))
        return Image(src) if kind.startswith("image") else Audio(src)
    raise BadInputError(f"{where}: part type must be text, image or audio, got {kind!r}")


def check_part(engine, p, where: str) -> Part:
    """`p` as a valid Part (a str or dict becomes one); a BadInputError naming `where` and
    the value otherwise. An Embeddings part comes back with float32 values."""
    from .engine import check_text

    if isinstance(p, str):
        p = Text(p)
    elif isinstance(p, dict):
        p = from_dict(p, where)
    if isinstance(p, Text):
        if not isinstance(p.text, str):
            raise BadInputError(f"{where}: text must be a string")
        check_text(p.text)
        return p
    if isinstance(p, Embeddings):
        v = np.asarray(p.values)
        hidden = int(engine.config.hidden_size)
        if v.ndim != 2 or v.shape[1] != hidden or v.shape[0] < 1:
            raise BadInputError(f"{where}: embeddings must be [m, {hidden}] (m >= 1), got {list(v.shape)}")
        if v.shape[0] > engine.max_tokens:
            raise BadInputError(f"{where}: {v.shape[0]} embedding rows exceed the KV-cache capacity of "
                                f"{engine.max_tokens} tokens (raise max_tokens)")
        if not np.issubdtype(v.dtype, np.floating):
            raise BadInputError(f"{where}: embeddings must be finite floats, got {v.dtype}")
        with np.errstate(over="ignore"):
            v = v.astype(np.float32, copy=False)
        if not np.isfinite(v).all():  # after the cast: float64 beyond float32's range is inf too
            bad = np.argwhere(~np.isfinite(v))[0]
            raise BadInputError(f"{where}: embeddings must be finite floats, row {bad[0]} column {bad[1]} "
                                f"is {v[bad[0], bad[1]]}")
        tok = _check_id(engine, p.token_id, where)
        return p if v is p.values and type(p.token_id) is int else Embeddings(v, tok)
    if isinstance(p, Tokens):
        try:
            return Tokens(engine.check_ids(p.ids))
        except BadInputError as e:
            raise BadInputError(f"{where}: {e}") from None
    if isinstance(p, (Image, Audio)):
        from . import media

        kind = media_kind(p)
        m = media.require(engine, kind, where)
        hidden = int(engine.config.hidden_size)
        if p.encoded and all(isinstance(e, Embeddings) and e.token_id == m.token_id and e.values.shape ==
                             (m.soft_tokens, hidden) for e in p.encoded):
            return p  # encoded for this model already
        if isinstance(p, Image):
            return Image(p.source, encoded=(media.encode_image(engine, p.source, where),))
        return Audio(p.source, encoded=media.encode_audio(engine, p.source, where))
    raise BadInputError(f"{where}: expected text, Embeddings, Image, Audio or Tokens, got {type(p).__name__}")


def _check_id(engine, tok, where: str) -> int:
    vocab = int(engine.config.vocab_size)
    if isinstance(tok, (bool, np.bool_)) or not isinstance(tok, (int, np.integer)) or not 0 <= tok < vocab:
        raise BadInputError(f"{where}: placeholder token_id {tok!r} is outside the vocabulary (0..{vocab - 1})")
    return int(tok)


def resolve(engine, parts, add_bos: bool) -> tuple[list[int], SoftRows | None]:
    """Token ids for `parts`, and the soft rows (positions relative to those ids) to splice."""
    parts = [check_part(engine, p, f"content part {i}") for i, p in enumerate(parts)]
    bos = engine.tokenizer.bos_id
    lead_ids = bool(parts) and isinstance(parts[0], Tokens)
    ids: list[int] = [bos] if add_bos and bos is not None and not lead_ids else []
    rows: list[int] = []
    values: list[np.ndarray] = []
    for p in parts:
        if isinstance(p, Text):
            ids += engine.tokenize(p.text, add_bos=False)
        elif isinstance(p, Tokens):
            ids += p.ids
        elif isinstance(p, (Image, Audio)):
            from .media import expansion_ids

            for e in p.encoded:  # the processor's expansion around each item's rows
                item, first = expansion_ids(engine, media_kind(p), e.values.shape[0])
                rows += range(len(ids) + first, len(ids) + first + e.values.shape[0])
                ids += item
                values.append(e.values)
        else:
            m = p.values.shape[0]
            rows += range(len(ids), len(ids) + m)
            ids += [int(p.token_id)] * m
            values.append(p.values)
    if not rows:
        return ids, None
    return ids, SoftRows(np.asarray(rows, np.int64), np.concatenate(values, axis=0))
