"""Image and audio input for an Engine whose bundle keeps Gemma 3n's towers.

An image or audio source (a file path, the file's bytes, or a `data:` URL) becomes soft rows
in the text decoder's input space, one `Embeddings` part per item:

* an image: decoded and resized by edgelm.multimodal (the checkpoint's processor settings),
  run through the vision tower and its embedder: `vision.soft_tokens` rows (256 for Gemma 3n);
* audio: decoded, mixed to mono, resampled to 16 kHz, cut into clips of at most
  `MAX_CLIP_SECONDS` (30 s, the longest clip Gemma 3n's processor passes: its 188 audio
  tokens are 30 s at 6.25 tokens/s), and each clip run through the feature extractor, the
  audio tower and its embedder: `audio.soft_tokens` rows per clip. Longer audio thus
  becomes several clips, each its own <start_of_audio> ... <end_of_audio> block, where
  transformers' processor would silently cut it at 30 s.

`expansion_ids(engine, kind, n)` are the token ids an item's rows sit in (the processor's
"\n\n<start_of_image>" + placeholders + "<end_of_image>\n\n"), for prompts built from parts.
"""

from __future__ import annotations

import base64
import binascii
import os
import re

import numpy as np

from ..errors import BadInputError

MAX_CLIP_SECONDS = 30
KINDS = ("vision", "audio")
_PART_NAMES = {"vision": "image", "audio": "audio"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)


def modality(engine, kind: str):
    """The bundle's Modality for "vision" / "audio", or None where it has no such tower."""
    return getattr(engine.config, kind, None)


def require(engine, kind: str, where: str):
    m = modality(engine, kind)
    if m is None:
        raise BadInputError(f"{where}: this bundle ({engine.path.name}) has no {_PART_NAMES[kind]} encoder, so it "
                            f"takes {_accepts(engine)} only")
    return m


def _accepts(engine) -> str:
    kinds = [_PART_NAMES[k] for k in KINDS if modality(engine, k) is not None]
    return " and ".join(["text"] + kinds)


def read_source(src, where: str, allow_files: bool = True) -> tuple[bytes | str, str]:
    """(a path or the bytes, a label for errors) of an image or audio source: a path, bytes, or
    a data: URL (base64 or percent-encoded). Remote URLs are refused: edgelm never downloads."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), where
    if isinstance(src, os.PathLike):
        src = os.fspath(src)
    if not isinstance(src, str) or not src:
        raise BadInputError(f"{where}: expected a file path, the file's bytes or a data: URL, got "
                            f"{type(src).__name__ if not isinstance(src, str) else 'an empty string'}")
    m = _DATA_URL.match(src)
    if m:
        payload = src[m.end():]
        if m.group(3):
            try:
                return base64.b64decode(payload, validate=True), f"{where} (data: URL)"
            except (binascii.Error, ValueError):
                raise BadInputError(f"{where}: the data: URL is not valid base64") from None
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(payload), f"{where} (data: URL)"
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", src):
        if src.startswith("file://"):
            src = src[len("file://"):]
        else:
            raise BadInputError(f"{where}: {src[:60]!r} is a remote URL; edgelm reads local files and data: URLs "
                                f"only (download it first)")
    if not allow_files:
        raise BadInputError(f"{where}: local file paths are not accepted here (send the file as a data: URL, "
                            f"or start the server with --allow-local-files)")
    return src, src


def encode_image(engine, src, where: str = "image"):
    """Soft rows for one image: an Embeddings part of vision.soft_tokens rows."""
    from ..multimodal import load_image, preprocess_image
    from .content import Embeddings

    m = require(engine, "vision", where)
    data, label = read_source(src, where)
    _check_room(engine, m.soft_tokens + ITEM_OVERHEAD, f"{label}: an image")
    img = load_image(data, name=label) if isinstance(data, bytes) else load_image(data)
    try:
        pixels = preprocess_image(img, config=m.preprocess)
    except BadInputError as e:
        raise BadInputError(f"{label}: {e}") from None
    with engine.lock:
        rows = engine.model.encode_image(engine.config, engine.weights, engine.ops, pixels)
    return Embeddings(_frozen(rows), m.token_id)


def audio_samples(engine, src, where: str = "audio") -> tuple[np.ndarray, str]:
    """Mono 16 kHz samples of an audio source, and its label."""
    from ..multimodal import load_audio

    m = require(engine, "audio", where)
    rate = int(m.preprocess.get("sampling_rate", 16_000))
    data, label = read_source(src, where)
    x, _ = load_audio(data, sampling_rate=rate, name=label)
    return x, label


def encode_audio(engine, src, where: str = "audio") -> tuple:
    """Soft rows for one audio source: an Embeddings part of audio.soft_tokens rows per clip of
    at most MAX_CLIP_SECONDS."""
    from ..multimodal import Gemma3nAudioFeatures
    from .content import Embeddings

    m = require(engine, "audio", where)
    x, label = audio_samples(engine, src, where)
    fe = Gemma3nAudioFeatures(m.preprocess)
    clip = MAX_CLIP_SECONDS * fe.config.sampling_rate
    starts = list(range(0, len(x), clip))
    if len(starts) > 1 and -(-(len(x) - starts[-1]) // 128) * 128 < fe.frame_length + 1:
        starts.pop()  # a tail shorter than one 32 ms frame (padded to 128 samples) carries nothing
    _check_room(engine, len(starts) * (m.soft_tokens + ITEM_OVERHEAD),
                f"{label}: {len(x) / fe.config.sampling_rate:.1f} s of audio ({len(starts)} clip"
                f"{'s' if len(starts) > 1 else ''} of at most {MAX_CLIP_SECONDS} s)")
    parts = []
    for start in starts:
        try:
            feats, mask = fe(x[start:start + clip], max_length=None)
        except BadInputError as e:
            raise BadInputError(f"{label}: {e}") from None
        with engine.lock:
            rows = engine.model.encode_audio(engine.config, engine.weights, engine.ops, feats, ~mask)
        parts.append(Embeddings(_frozen(rows), m.token_id))
    return tuple(parts)


ITEM_OVERHEAD = 4  # an item's begin and end markers and the newlines around them (at most)


def _check_room(engine, tokens: int, what: str) -> None:
    """Refuse, before any tower runs, an item that could not fit the KV cache even alone."""
    from ..errors import CapacityError

    if tokens > engine.max_tokens:
        raise CapacityError(f"{what} needs about {tokens} prompt tokens, more than the KV-cache capacity of "
                            f"{engine.max_tokens} (raise max_tokens / --max-tokens)")


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.float32, order="C")
    a.setflags(write=False)
    return a


def marker_strings(engine, kind: str) -> tuple[str, str, str]:
    """(begin, placeholder, end) token texts of a modality, as the tokenizer spells them."""
    m = modality(engine, kind)
    piece = engine.tokenizer.id_to_piece
    return piece(m.begin_id), piece(m.token_id), piece(m.end_id)


def expansion_ids(engine, kind: str, rows: int) -> tuple[list[int], int]:
    """The ids of one item in a prompt built from parts, and the offset of its first soft row:
    "\n\n", begin, `rows` placeholders, end, "\n\n" (the processor's expansion)."""
    m = modality(engine, kind)
    nl = engine.tokenizer.encode("\n\n", add_bos=False)
    head = nl + [m.begin_id]
    return head + [m.token_id] * rows + [m.end_id] + nl, len(head)
