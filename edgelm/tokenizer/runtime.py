"""Tokenizers for edgelm bundles at run time: :class:`Tokenizer`, :class:`StreamDecoder` and the
encoders behind them, loaded fast from a bundle's tokenizer blob. The blobs are built at
conversion time from a GGUF or a Hugging Face checkpoint by :mod:`edgelm.tokenizer.build`
(never imported here); the SentencePiece protobuf codec is :mod:`edgelm.tokenizer.wire`.

Two serializations can live in a bundle's tokenizer blob (the `kind` string names which):

``"sentencepiece-model"`` (what GGUF sources and HF checkpoints with only a ``tokenizer.model``
produce)
    A SentencePiece ``ModelProto`` of type BPE with byte fallback, identity normalization and
    no dummy prefix, encoded by edgelm's native BPE encoder (``edgelm/_native/tokenizer.cpp``,
    module ``edgelm._native._tok``), which gives the same ids as the ``sentencepiece``
    library's ``Encode`` (the tests check it against that library) without it: the pieces are
    read in place from the blob, a view of the bundle's mmap, and the tables cost ~5.5 MiB for
    Gemma's 262k vocab (the library: ~45 MiB, twice with the plain-text model), load in
    ~0.03 s (against ~1.2 s for the equivalent ``tokenizer.json``) and encode text with line
    breaks ~2.5x faster than the library (on par for one long line). For a GGUF the model is
    rebuilt from ``tokenizer.ggml.tokens/scores/token_type`` so that ids agree with
    transformers' GGUF converter
    (``transformers/integrations/gguf/gguf_tokenizer_mapping.py::gemma_tokenizer``):

    * Gemma's whitespace-run tokens, stored by llama.cpp as real spaces (``"  "``), are
      spelled ``"▁▁"`` again and made ordinary BPE pieces;
    * merge priority follows a piece's position in the vocabulary (score ``-id``), which is
      the order transformers rebuilds its merges in;
    * every token that transformers matches whole in the text (control and user-defined
      tokens: ``<start_of_turn>``, ``<bos>``, ``\\n``, ``<b>`` ...) is a ``USER_DEFINED``
      piece, which SentencePiece matches whole (longest match, never merged), so chat
      markup written literally encodes to its single ids. ``<unk>`` must stay SentencePiece's
      ``UNKNOWN`` piece, so it is split out in Python.

    The pieces that were control tokens, i.e. the ones ``decode(skip_special=True)`` drops,
    are listed in ``trainer_spec.control_symbols``, and the trainer spec is written *first*
    in the message (protobuf allows any field order) so loading finds the list without
    walking the 262k pieces. The blob is still an ordinary model file any SentencePiece
    tool loads. A foreign ``tokenizer.model`` handed to :meth:`Tokenizer.from_blob` is
    normalized on load (slower) the same way. ``parse_special=False`` encodes as the same
    model with the control symbols typed ``CONTROL`` again (``wire._plain_text_model``, a
    per-piece flag in the native encoder, not a second model). Only BPE models with an empty
    ``precompiled_charsmap`` are supported (what edgelm writes and Gemma's
    ``tokenizer.model`` is); others are a :class:`FormatError`.

``"hf-tokenizers-json"`` (HF checkpoints with a ``tokenizer.json``)
    The file as-is, loaded with the ``tokenizers`` library (~1 s for Gemma's vocab: its
    500k merges dominate).

Decoding is done here from per-token bytes (``▁`` → space, ``<0xNN>`` → that byte) joined and
decoded as UTF-8 with ``errors="replace"``; :class:`StreamDecoder` feeds the same bytes to an
incremental UTF-8 decoder, so streamed pieces always add up to :meth:`Tokenizer.decode` and a
character split over byte-fallback tokens is held back until it is complete. For valid
text this equals transformers' decode; for ids that spell invalid UTF-8 the number of U+FFFD
can differ (Python replaces each maximal invalid subsequence, transformers' ByteFallback
each byte of a bad run).
"""

from __future__ import annotations

import codecs
import json
from typing import Iterable

import numpy as np

from ..errors import FormatError
from .wire import SPIECE_UNDERLINE, SPIECE_UNDERLINE_UTF8, _is_edgelm_form, _normalize_spm_model

__all__ = [
    "KIND_SENTENCEPIECE",
    "KIND_HF_JSON",
    "Tokenizer",
    "StreamDecoder",
]

KIND_SENTENCEPIECE = "sentencepiece-model"
KIND_HF_JSON = "hf-tokenizers-json"


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _stop_list(*ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _byte_piece(piece: str) -> int | None:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


class _SentencePieceBackend:
    """A ``sentencepiece-model`` blob encoded by edgelm's native BPE encoder
    (``edgelm._native._tok``, same ids as the ``sentencepiece`` library). The blob may be a
    memoryview of the bundle's mmap: the encoder keeps it and copies nothing."""

    def __init__(self, data):
        from .._native import _tok

        try:
            if not _is_edgelm_form(data):  # a plain model file, not written by edgelm: ~1 s slower
                data = _normalize_spm_model(data)
            self.m = _tok.BPEModel(data)
        except (FormatError, ValueError, IndexError, BufferError) as e:  # UnicodeDecodeError included
            raise FormatError(f"cannot load the sentencepiece tokenizer: {e}") from None
        self.size = self.m.size
        unk_id = self.m.unk_id
        self.unk_id = unk_id
        self.unk_piece = self.id_to_piece(unk_id) if unk_id >= 0 else None
        # SentencePiece never matches its UNKNOWN piece in text; transformers does (it is one of
        # the GGUF's control tokens), so it is split out here. edgelm's form always lists it.
        self.split_unk = self.unk_piece is not None

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with control-token literals read as ordinary text (the model
        with its control symbols typed CONTROL, see `wire._plain_text_model`)."""
        return self.m.encode(text, True)

    def encode(self, text: str) -> list[int]:
        enc = self.m.encode
        if self.split_unk and self.unk_piece in text:
            out: list[int] = []
            for k, part in enumerate(text.split(self.unk_piece)):
                if k:
                    out.append(self.unk_id)
                if part:
                    out.extend(enc(part))
            return out
        return enc(text)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.size:
            raise IndexError(f"token id {i} is out of range (vocabulary of {self.size})")
        return self.m.id_to_piece(i).decode("utf-8", errors="replace")

    def token_to_id(self, s: str) -> int | None:
        try:
            i = self.m.piece_to_id(s.encode("utf-8"))
        except UnicodeEncodeError:
            return None
        return i if i >= 0 else None

    def special_ids(self) -> set[int]:
        return set(self.m.control_ids())

    def token_bytes(self, i: int) -> bytes:
        if not 0 <= i < self.size:
            raise IndexError(f"token id {i} is out of range (vocabulary of {self.size})")
        raw = self.m.id_to_piece(i)
        b = _byte_piece(raw.decode("utf-8", errors="replace"))
        if b is not None:
            return bytes((b,))
        return raw.replace(SPIECE_UNDERLINE_UTF8, b" ")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (ByteLevel decoders)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _HFJsonBackend:
    def __init__(self, data: bytes):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:  # pragma: no cover
            raise FormatError("this bundle's tokenizer needs the 'tokenizers' package (pip install tokenizers)")
        try:
            self.tk = _HFTokenizer.from_str(_as_bytes(data).decode("utf-8"))
        except Exception as e:
            raise FormatError(f"cannot load the tokenizer.json tokenizer: {e}") from None
        self.size = self.tk.get_vocab_size(with_added_tokens=True)
        self._steps, self.strip_first_space = self._decoder_plan()

    def _decoder_plan(self) -> tuple[list | None, bool]:
        """Per-token decoding steps mirroring the tokenizer's decoder, or None if unsupported."""
        dec = self.tk.decoder
        if dec is None:
            return [], False
        try:
            spec = json.loads(dec.__getstate__())
        except Exception:
            return None, False
        items = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
        steps: list = []
        strip_first = False
        for it in items:
            t = it.get("type")
            if t == "Replace":
                pat = it.get("pattern", {})
                if "String" not in pat:
                    return None, False
                steps.append(("replace", pat["String"], it.get("content", "")))
            elif t == "ByteFallback":
                steps.append(("bytefallback",))
            elif t == "Fuse":
                pass
            elif t == "Strip":
                if it.get("stop", 0) or it.get("content", " ") != " ":
                    return None, False
                strip_first = strip_first or it.get("start", 0) > 0
            elif t == "ByteLevel":
                steps.append(("bytelevel",))
            elif t == "Metaspace":
                steps.append(("replace", it.get("replacement", SPIECE_UNDERLINE), " "))
                scheme = it.get("prepend_scheme", "always" if it.get("add_prefix_space", True) else "never")
                strip_first = strip_first or scheme in ("always", "first")
            else:
                return None, False
        return steps, strip_first

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        self.tk.encode_special_tokens = True
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = False

    def adds_bos(self, bos: int) -> bool:
        ids = self.tk.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == bos

    def id_to_piece(self, i: int) -> str:
        s = self.tk.id_to_token(i) if 0 <= i else None
        if s is None:
            raise IndexError(f"token id {i} is out of range (vocabulary of {self.size})")
        return s

    def token_to_id(self, s: str) -> int | None:
        return self.tk.token_to_id(s)

    def special_ids(self) -> set[int]:
        return {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    _b2u_inv: dict[str, int] | None = None

    def token_bytes(self, i: int) -> bytes:
        piece = self.id_to_piece(i)
        if self._steps is None:
            return self.tk.decode([i], skip_special_tokens=False).encode("utf-8")
        val: str | bytes = piece
        for step in self._steps:
            if isinstance(val, bytes):
                break
            if step[0] == "replace":
                val = val.replace(step[1], step[2])
            elif step[0] == "bytefallback":
                b = _byte_piece(val)
                if b is not None:
                    val = bytes((b,))
            elif step[0] == "bytelevel":
                if _HFJsonBackend._b2u_inv is None:
                    _HFJsonBackend._b2u_inv = {c: b for b, c in _bytes_to_unicode().items()}
                inv = _HFJsonBackend._b2u_inv
                if all(c in inv for c in val):
                    val = bytes(inv[c] for c in val)
        return val if isinstance(val, bytes) else val.encode("utf-8")


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, np.ndarray):
        return data.tobytes()
    return bytes(data)


def _make_backend(kind: str, data):
    if kind == KIND_SENTENCEPIECE:
        # bytes, or a memoryview (of the bundle's mmap) as it is: never copied
        if isinstance(data, memoryview) and (data.ndim != 1 or data.format not in ("B", "b", "c")):
            data = data.cast("B") if data.c_contiguous else bytes(data)
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            data = _as_bytes(data)
        return _SentencePieceBackend(data)
    if kind == KIND_HF_JSON:
        return _HFJsonBackend(data)
    raise FormatError(
        f"unknown tokenizer kind {kind!r}; this edgelm reads {KIND_SENTENCEPIECE!r} and {KIND_HF_JSON!r}"
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode/decode with a bundle's tokenizer. Build with :meth:`from_blob`."""

    def __init__(self, kind: str, backend, special: dict):
        self.kind = kind
        self._b = backend
        self.special = dict(special)
        self.bos_id: int | None = _opt_int(special.get("bos"))
        self.eos_id: int | None = _opt_int(special.get("eos"))
        self.unk_id: int | None = _opt_int(special.get("unk"))
        self.pad_id: int | None = _opt_int(special.get("pad"))
        self.start_of_turn_id: int | None = _opt_int(special.get("start_of_turn"))
        self.end_of_turn_id: int | None = _opt_int(special.get("end_of_turn"))
        stop = special.get("stop")
        if stop is None:
            stop = _stop_list(self.eos_id, self.end_of_turn_id)
        self.stop_ids: set[int] = {int(i) for i in stop}
        self.add_bos: bool = bool(special.get("add_bos", True))
        self._bytes_cache: dict[int, bytes] = {}
        self._special_ids: frozenset[int] | None = None
        self._strip_first = bool(getattr(backend, "strip_first_space", False))

    @classmethod
    def from_blob(cls, kind: str, data: bytes, special: dict) -> "Tokenizer":
        return cls(kind, _make_backend(kind, data), special)

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._b.size

    def token_to_id(self, s: str) -> int | None:
        """The id of vocabulary piece `s` (spelled as in the vocabulary, e.g. "▁the"), or None."""
        return self._b.token_to_id(s)

    def id_to_piece(self, i: int) -> str:
        return self._b.id_to_piece(int(i))

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of control tokens (BOS, EOS, <start_of_turn>, <unusedN>...): what skip_special drops."""
        if self._special_ids is None:
            ids = set(self._b.special_ids())
            for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id):
                if i is not None:
                    ids.add(i)
            self._special_ids = frozenset(ids)
        return self._special_ids

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. With `parse_special` (the default, what chat templates need),
        special tokens written literally ("<start_of_turn>", "<unk>") map to their ids;
        without it they are read as ordinary text, as llama.cpp's ``parse_special=false``
        does (perplexity over corpora that contain such strings). BOS is prepended only when
        `add_bos` is true."""
        ids = self._b.encode(text) if parse_special else self._b.encode_plain(text)
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)

    # -- decoding ----------------------------------------------------------------------------

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` contributes to decoded text."""
        b = self._bytes_cache.get(i)
        if b is None:
            b = self._b.token_bytes(int(i))
            self._bytes_cache[i] = b
        return b

    def vocab_bytes(self) -> list[bytes]:
        """Every token's bytes in id order, read past the per-token cache (which would keep
        262k entries alive for a caller that reads the vocabulary once)."""
        return [self._b.token_bytes(i) for i in range(self.vocab_size)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        if skip_special:
            skip = self.special_ids
            ids = [i for i in ids if i not in skip]
        cache = self._bytes_cache
        tb = self.token_bytes
        raw = b"".join([cache.get(i) or tb(i) for i in ids])
        if self._strip_first and raw[:1] == b" ":
            raw = raw[1:]
        return raw.decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


class StreamDecoder:
    """Turns token ids, fed one at a time, into text pieces.

    Bytes of each token go through an incremental UTF-8 decoder, so a character spread over
    several byte-fallback tokens is held back until complete (the piece is "" meanwhile) and
    ``"".join(pieces) + flush() == tokenizer.decode(ids, skip_special)``. O(1) per token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer._strip_first

    def feed(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        b = self._tok.token_bytes(token_id)
        if self._at_start and b:
            self._at_start = False
            if b[:1] == b" ":
                b = b[1:]
        return self._dec.decode(b)

    def feed_many(self, ids: Iterable[int]) -> str:
        return "".join(self.feed(i) for i in ids)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD). Resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self.reset()
        return out

    def reset(self) -> None:
        self._dec.reset()
        self._at_start = self._tok._strip_first

    @property
    def pending(self) -> bool:
        """Whether bytes of an incomplete character are held back."""
        return bool(self._dec.getstate()[0])
