"""Tokenizers for edgelm bundles: built from a GGUF or a Hugging Face checkpoint, loaded fast.

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
    model with the control symbols typed ``CONTROL`` again (:func:`_plain_text_model`, a
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
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import FormatError

__all__ = [
    "KIND_SENTENCEPIECE",
    "KIND_HF_JSON",
    "tokenizer_from_gguf",
    "tokenizer_from_hf_dir",
    "Tokenizer",
    "StreamDecoder",
]

KIND_SENTENCEPIECE = "sentencepiece-model"
KIND_HF_JSON = "hf-tokenizers-json"

SPIECE_UNDERLINE = "\u2581"
SPIECE_UNDERLINE_UTF8 = SPIECE_UNDERLINE.encode("utf-8")

# SentencePiece ModelProto.SentencePiece.Type; GGUF's tokenizer.ggml.token_type uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Field numbers in sentencepiece_model.proto.
_MP_PIECES, _MP_TRAINER, _MP_NORMALIZER = 1, 2, 3
_SP_PIECE, _SP_SCORE, _SP_TYPE = 1, 2, 3
_TS_MODEL_PREFIX, _TS_MODEL_TYPE, _TS_VOCAB_SIZE, _TS_CONTROL_SYMBOLS, _TS_BYTE_FALLBACK = 2, 3, 4, 30, 35
_TS_UNK_ID, _TS_BOS_ID, _TS_EOS_ID, _TS_PAD_ID = 40, 41, 42, 43
_TS_UNK_PIECE, _TS_BOS_PIECE, _TS_EOS_PIECE, _TS_PAD_PIECE = 45, 46, 47, 48
_NS_NAME, _NS_ADD_DUMMY_PREFIX, _NS_REMOVE_EXTRA_WS, _NS_ESCAPE_WS = 1, 3, 4, 5
_MODEL_TYPE_BPE = 2
# trainer_spec.model_prefix (only meaningful to the trainer) marks a model in edgelm's form
_EDGELM_MARK = b"edgelm:special-in-text"


# --------------------------------------------------------------------------------------------
# Minimal protobuf wire format (enough for sentencepiece's ModelProto; no protobuf dependency)
# --------------------------------------------------------------------------------------------

_SMALL_VARINT = [bytes([i]) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 128:
        return _SMALL_VARINT[n]
    n &= 0xFFFFFFFFFFFFFFFF  # negative int32/int64 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _tag(field, 2) + _varint(len(payload)) + payload


def _vi(field: int, n: int) -> bytes:
    return _tag(field, 0) + _varint(n)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise FormatError("truncated protobuf varint in sentencepiece model")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FormatError("malformed protobuf varint in sentencepiece model")


def _iter_fields(buf, start: int = 0, end: int | None = None):
    """Yield `(field, wire, value, raw_start, raw_end)`; value is an int for varint/fixed
    fields and a `(start, end)` span for length-delimited ones."""
    pos = start
    end = len(buf) if end is None else end
    while pos < end:
        raw_start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value = (pos, pos + length)
            pos += length
        elif wire == 5:
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise FormatError(f"unsupported protobuf wire type {wire} in sentencepiece model")
        if pos > end:
            raise FormatError("truncated sentencepiece model")
        yield field, wire, value, raw_start, pos


_F32 = struct.Struct("<f")


def _piece_msg(piece: str, score: float, typ: int) -> bytes:
    pb = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(pb)) + pb + b"\x15" + _F32.pack(score) + b"\x18" + _varint(typ)
    return b"\x0a" + _varint(len(body)) + body


def _trainer_spec(
    vocab_size: int,
    control_symbols: Iterable[str],
    *,
    unk: int,
    bos: int | None,
    eos: int | None,
    pad: int | None,
    pieces: list[str],
    mark: bool = True,
) -> bytes:
    ts = [_ld(_TS_MODEL_PREFIX, _EDGELM_MARK)] if mark else []
    ts += [_vi(_TS_MODEL_TYPE, _MODEL_TYPE_BPE), _vi(_TS_VOCAB_SIZE, vocab_size), _vi(_TS_BYTE_FALLBACK, 1)]
    ts.append(_vi(_TS_UNK_ID, unk))
    ts.append(_ld(_TS_UNK_PIECE, pieces[unk].encode("utf-8")))
    for fid, fpiece, value in (
        (_TS_BOS_ID, _TS_BOS_PIECE, bos),
        (_TS_EOS_ID, _TS_EOS_PIECE, eos),
        (_TS_PAD_ID, _TS_PAD_PIECE, pad),
    ):
        if value is None or not 0 <= value < len(pieces):
            ts.append(_vi(fid, -1))
        else:
            ts.append(_vi(fid, value))
            ts.append(_ld(fpiece, pieces[value].encode("utf-8")))
    ts.extend(_ld(_TS_CONTROL_SYMBOLS, s.encode("utf-8")) for s in control_symbols)
    return b"".join(ts)


def _normalizer_spec(add_dummy_prefix: bool) -> bytes:
    return (
        _ld(_NS_NAME, b"identity")
        + _vi(_NS_ADD_DUMMY_PREFIX, int(add_dummy_prefix))
        + _vi(_NS_REMOVE_EXTRA_WS, 0)
        + _vi(_NS_ESCAPE_WS, 1)
    )


def _build_spm_model(
    tokens: list[str],
    scores: Iterable[float],
    types: Iterable[int],
    *,
    unk: int,
    bos: int | None,
    eos: int | None,
    pad: int | None,
    add_dummy_prefix: bool,
    match_special_in_text: bool = True,
) -> bytes:
    """Serialize a BPE ModelProto (trainer spec first, see the module docstring).

    `types` are SentencePiece/GGUF piece types. With `match_special_in_text` (what edgelm
    stores), CONTROL pieces become USER_DEFINED and are listed as control symbols; without
    it they stay CONTROL (an ordinary model file, as a checkpoint's tokenizer.model would be).
    """
    if unk is None or not 0 <= unk < len(tokens):
        raise FormatError("the vocabulary has no unknown token, which a sentencepiece model needs")
    parts = []
    controls = []
    for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
        typ = int(typ)
        if i == unk:
            if match_special_in_text:
                controls.append(piece)
            typ = _UNKNOWN
        elif typ == _CONTROL and match_special_in_text:
            controls.append(piece)
            typ = _USER_DEFINED
        if typ == _USER_DEFINED and " " in piece:
            # SentencePiece matches user-defined pieces against text whose spaces are already "▁".
            piece = piece.replace(" ", SPIECE_UNDERLINE)
        parts.append(_piece_msg(piece, float(score), typ))
    ts = _trainer_spec(
        len(tokens), controls, unk=unk, bos=bos, eos=eos, pad=pad, pieces=tokens, mark=match_special_in_text
    )
    return _ld(_MP_TRAINER, ts) + b"".join(parts) + _ld(_MP_NORMALIZER, _normalizer_spec(add_dummy_prefix))


def _is_edgelm_form(data) -> bool:
    """Whether a model is in edgelm's form: its first field is the trainer spec, whose first
    field is the edgelm mark. O(1): nothing else is parsed."""
    try:
        if not data or data[0] != (_MP_TRAINER << 3 | 2):
            return False
        _, pos = _read_varint(data, 1)
        if data[pos] != (_TS_MODEL_PREFIX << 3 | 2):
            return False
        n, pos = _read_varint(data, pos + 1)
        return n == len(_EDGELM_MARK) and bytes(data[pos : pos + n]) == _EDGELM_MARK
    except (FormatError, IndexError):
        return False


def _control_symbols(data) -> list[str]:
    """trainer_spec.control_symbols of a model in edgelm's form (the leading trainer spec)."""
    length, pos = _read_varint(data, 1)
    controls = []
    for field, wire, value, _, _ in _iter_fields(data, pos, pos + length):
        if field == _TS_CONTROL_SYMBOLS and wire == 2:
            controls.append(bytes(data[value[0] : value[1]]).decode("utf-8", errors="replace"))
    return controls


def _normalize_spm_model(data: bytes) -> bytes:
    """Rewrite any sentencepiece model into edgelm's form: CONTROL pieces (and the unknown
    piece) matched whole in text, listed in a leading trainer spec. Scores, normalizer and
    everything else are kept."""
    data = bytes(data)
    pieces_raw: list[bytes] = []
    ctrl_piece: list[str] = []
    trainer = None
    rest: list[bytes] = []
    for field, wire, value, rs, re_ in _iter_fields(data):
        if field == _MP_PIECES and wire == 2:
            s, e = value
            piece, typ, score_raw = "", _NORMAL, None
            other = []
            for f2, w2, v2, r2s, r2e in _iter_fields(data, s, e):
                if f2 == _SP_PIECE and w2 == 2:
                    piece = data[v2[0] : v2[1]].decode("utf-8")
                elif f2 == _SP_TYPE and w2 == 0:
                    typ = v2
                elif f2 == _SP_SCORE and w2 == 5:
                    score_raw = data[r2s:r2e]
                else:
                    other.append(data[r2s:r2e])
            if typ in (_CONTROL, _UNKNOWN):
                ctrl_piece.append(piece)
                if typ == _CONTROL:
                    typ = _USER_DEFINED
            if typ == _USER_DEFINED and " " in piece:
                piece = piece.replace(" ", SPIECE_UNDERLINE)
            pb = piece.encode("utf-8")
            body = b"\x0a" + _varint(len(pb)) + pb + (score_raw or b"") + b"\x18" + _varint(typ) + b"".join(other)
            pieces_raw.append(b"\x0a" + _varint(len(body)) + body)
        elif field == _MP_TRAINER and wire == 2:
            trainer = data[value[0] : value[1]]
        else:
            rest.append(data[rs:re_])
    if not pieces_raw:
        raise FormatError("the sentencepiece model has no pieces")
    kept = b""
    if trainer is not None:
        # drop the old control-symbol list and model prefix; the rest is kept verbatim
        kept = b"".join(
            trainer[rs:re_]
            for f, w, v, rs, re_ in _iter_fields(trainer)
            if f not in (_TS_CONTROL_SYMBOLS, _TS_MODEL_PREFIX)
        )
    controls = b"".join(_ld(_TS_CONTROL_SYMBOLS, s.encode("utf-8")) for s in ctrl_piece)
    ts = _ld(_TS_MODEL_PREFIX, _EDGELM_MARK) + kept + controls
    return _ld(_MP_TRAINER, ts) + b"".join(pieces_raw) + b"".join(rest)


def _plain_text_model(data) -> bytes:
    """A copy of an edgelm-form model in which the control symbols are CONTROL pieces again,
    so SentencePiece never matches them in text: ``"<unk>"`` or ``"<start_of_turn>"`` written
    literally is then tokenized as ordinary characters. USER_DEFINED pieces that were never
    control tokens (Gemma's whitespace runs, HTML tags) are still matched whole, as llama.cpp
    does with ``parse_special=false``."""
    data = bytes(data)
    controls = {s.encode("utf-8") for s in _control_symbols(data)}
    out = []
    for field, wire, value, rs, re_ in _iter_fields(data):
        if field == _MP_PIECES and wire == 2:
            s, e = value
            piece = typ = None
            for f2, w2, v2, _, _ in _iter_fields(data, s, e):
                if f2 == _SP_PIECE and w2 == 2:
                    piece = data[v2[0] : v2[1]]
                elif f2 == _SP_TYPE and w2 == 0:
                    typ = v2
            if typ == _USER_DEFINED and piece in controls:
                body = b"".join(
                    data[r2s:r2e] if f2 != _SP_TYPE else _vi(_SP_TYPE, _CONTROL)
                    for f2, _, _, r2s, r2e in _iter_fields(data, s, e)
                )
                out.append(_ld(_MP_PIECES, body))
                continue
        out.append(data[rs:re_])
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------

# GGUF metadata value types -> struct format / numpy dtype (8 = string and 9 = array are handled apart)
_GGUF_SCALAR = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_GGUF_NP = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"
}
_U64 = struct.Struct("<Q")


def _read_gguf_metadata_file(path: str | os.PathLike) -> dict[str, Any]:
    """GGUF metadata keys `general.*` and `tokenizer.*` (string arrays decoded only under
    `tokenizer.`), read straight from the file: ~0.3 s for a 262k vocab, where constructing a
    `gguf.GGUFReader` takes >10 s."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read GGUF file {path}: {e}") from None
    try:
        if buf[:4] != b"GGUF":
            raise FormatError(f"{path} is not a GGUF file (bad magic)")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        pos = 24
        out: dict[str, Any] = {}

        def read_str(p):
            (n,) = _U64.unpack_from(buf, p)
            p += 8
            return buf[p : p + n], p + n

        for _ in range(n_kv):
            kb, pos = read_str(pos)
            key = kb.decode("utf-8")
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            want = key.startswith("tokenizer.") or key.startswith("general.")
            if vtype in _GGUF_SCALAR:
                (v,) = struct.unpack_from(_GGUF_SCALAR[vtype], buf, pos)
                pos += struct.calcsize(_GGUF_SCALAR[vtype])
                if want:
                    out[key] = v
            elif vtype == 8:
                v, pos = read_str(pos)
                if want:
                    out[key] = v.decode("utf-8", errors="replace")
            elif vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_NP:
                    dt = np.dtype(_GGUF_NP[etype])
                    if want:
                        arr = np.frombuffer(buf, dtype=dt, count=count, offset=pos).copy()
                        out[key] = arr.astype(bool) if etype == 7 else arr
                    pos += dt.itemsize * count
                elif etype == 8:
                    if key.startswith("tokenizer."):
                        vals = []
                        unpack = _U64.unpack_from
                        for _ in range(count):
                            (n,) = unpack(buf, pos)
                            pos += 8
                            vals.append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                            pos += n
                        out[key] = vals
                    else:
                        for _ in range(count):
                            (n,) = _U64.unpack_from(buf, pos)
                            pos += 8 + n
                else:
                    raise FormatError(f"{path}: GGUF key {key} holds an array of unsupported type {etype}")
            else:
                raise FormatError(f"{path}: GGUF key {key} has unsupported value type {vtype}")
        return out
    except struct.error:
        raise FormatError(f"{path}: GGUF metadata is truncated") from None
    finally:
        buf.close()


def _reader_metadata(reader) -> dict[str, Any]:
    """The same keys as `_read_gguf_metadata_file`, from a `gguf.GGUFReader`."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        types = [int(t) for t in field.types]
        if not types:
            continue
        if types[0] == 9:
            sub = types[-1]
            if sub == 8:
                out[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            elif len(field.data):
                arr = np.concatenate([np.asarray(field.parts[i]).reshape(-1) for i in field.data])
                out[key] = arr.astype(bool) if sub == 7 else arr
            else:
                out[key] = np.zeros(0)
        elif types[0] == 8:
            out[key] = bytes(field.parts[-1]).decode("utf-8", errors="replace")
        else:
            v = field.parts[-1].tolist()[0]
            out[key] = bool(v) if types[0] == 7 else v
    return out


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _stop_list(*ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def tokenizer_from_gguf(reader) -> tuple[str, bytes, dict]:
    """(kind, data, special) for the tokenizer a GGUF describes.

    `reader` is a `gguf.GGUFReader`, or a path to the GGUF file (then the metadata is read
    directly, which is much faster than constructing a GGUFReader).
    """
    if isinstance(reader, (str, os.PathLike)):
        md = _read_gguf_metadata_file(reader)
        where = str(reader)
    else:
        md = _reader_metadata(reader)
        where = str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF")
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise FormatError(f"{where}: the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    if model != "llama":
        raise FormatError(
            f"{where}: GGUF tokenizer model {model!r} is not supported; edgelm reads SentencePiece-style "
            "('llama') vocabularies, which Gemma uses"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise FormatError(f"{where}: tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    types = md.get("tokenizer.ggml.token_type")
    types = np.full(n, _NORMAL, dtype=np.int32) if types is None else np.asarray(types, dtype=np.int32)
    scores = md.get("tokenizer.ggml.scores")
    scores = np.zeros(n, dtype=np.float32) if scores is None else np.asarray(scores, dtype=np.float32)
    if len(types) != n or len(scores) != n:
        raise FormatError(f"{where}: tokenizer.ggml.tokens/scores/token_type have different lengths")
    arch = str(md.get("general.architecture", ""))
    index = {t: i for i, t in enumerate(tokens)}

    def tok_id(key: str, fallback: str | None) -> int | None:
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and 0 <= int(v) < n:
            return int(v)
        return index.get(fallback) if fallback else None

    bos = tok_id("bos_token_id", "<bos>")
    eos = tok_id("eos_token_id", "<eos>")
    unk = tok_id("unknown_token_id", "<unk>")
    pad = tok_id("padding_token_id", "<pad>")
    if unk is None:
        unk_types = np.nonzero(types == _UNKNOWN)[0]
        unk = int(unk_types[0]) if len(unk_types) else None
    if bos is None or eos is None or unk is None:
        raise FormatError(f"{where}: the GGUF vocabulary lacks a BOS, EOS or unknown token")

    tokens = list(tokens)
    types = types.copy()
    if arch.startswith("gemma"):
        # transformers' gemma_tokenizer: whitespace-run tokens are "▁▁..." BPE pieces, and
        # merges follow vocabulary order rather than the stored scores.
        for i in np.nonzero(types == _USER_DEFINED)[0].tolist():
            t = tokens[i]
            if t and not t.strip(" "):
                tokens[i] = SPIECE_UNDERLINE * len(t)
                types[i] = _NORMAL
        scores = -np.arange(n, dtype=np.float64)
        add_prefix_default = False
    else:
        add_prefix_default = True
    add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", add_prefix_default))
    data = _build_spm_model(
        tokens,
        scores.tolist(),
        types.tolist(),
        unk=unk,
        bos=bos,
        eos=eos,
        pad=pad,
        add_dummy_prefix=add_prefix,
    )
    sot = index.get("<start_of_turn>")
    eot = index.get("<end_of_turn>")
    special = {
        "bos": bos,
        "eos": eos,
        "unk": unk,
        "pad": pad,
        "start_of_turn": sot,
        "end_of_turn": eot,
        "stop": _stop_list(eos, eot, tok_id("eot_token_id", None), tok_id("eom_token_id", None)),
        "add_bos": bool(md.get("tokenizer.ggml.add_bos_token", True)),
    }
    return KIND_SENTENCEPIECE, data, special


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories
# --------------------------------------------------------------------------------------------

_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        v = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    return v if isinstance(v, dict) else {}


def _token_content(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _id_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def tokenizer_from_hf_dir(path) -> tuple[str, bytes, dict]:
    """(kind, data, special) from a Hugging Face checkpoint directory.

    Uses ``tokenizer.json`` when present (kind ``hf-tokenizers-json``), else ``tokenizer.model``
    (kind ``sentencepiece-model``, normalized so control tokens are matched in text). Special
    ids come from tokenizer_config.json, special_tokens_map.json, generation_config.json and
    config.json, then from the vocabulary (``<bos>``, ``<eos>``, ...).
    """
    d = Path(path)
    if not d.is_dir():
        raise FormatError(f"{d} is not a directory; expected a Hugging Face checkpoint directory")
    tj, tm = d / "tokenizer.json", d / "tokenizer.model"
    if tj.is_file():
        kind, data = KIND_HF_JSON, tj.read_bytes()
    elif tm.is_file():
        kind, data = KIND_SENTENCEPIECE, _normalize_spm_model(tm.read_bytes())
    else:
        raise FormatError(
            f"no tokenizer in {d}: looked for {' and '.join(_HF_TOKENIZER_FILES)} and found neither"
        )
    backend = _make_backend(kind, data)  # validates the data; used to map token strings to ids

    tcfg = _load_json(d / "tokenizer_config.json")
    smap = _load_json(d / "special_tokens_map.json")
    gcfg = _load_json(d / "generation_config.json")
    cfg = _load_json(d / "config.json")
    tcfg_text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}

    def from_strings(name: str) -> int | None:
        for src in (tcfg, smap):
            s = _token_content(src.get(f"{name}_token"))
            if s is not None:
                i = backend.token_to_id(s)
                if i is not None:
                    return i
        return None

    def from_configs(key: str) -> list[int]:
        for src in (gcfg, cfg, tcfg_text):
            ids = _id_list(src.get(key))
            if ids:
                return ids
        return []

    def pick(name: str, defaults: tuple[str, ...]) -> int | None:
        i = from_strings(name)
        if i is None:
            ids = from_configs(f"{name}_token_id")
            i = ids[0] if ids else None
        if i is None:
            for s in defaults:
                i = backend.token_to_id(s)
                if i is not None:
                    break
        return i

    bos = pick("bos", ("<bos>", "<s>"))
    eos = pick("eos", ("<eos>", "</s>"))
    unk = pick("unk", ("<unk>",))
    pad = pick("pad", ("<pad>",))
    if bos is None or eos is None:
        raise FormatError(f"{d}: cannot tell the BOS and EOS token ids from the tokenizer or config files")
    sot = backend.token_to_id("<start_of_turn>")
    eot = backend.token_to_id("<end_of_turn>")
    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    elif kind == KIND_HF_JSON:
        # a tokenizer.json's post-processor says whether the checkpoint's tokenizer adds BOS
        add_bos = backend.adds_bos(bos)
    else:
        add_bos = True
    special = {
        "bos": bos,
        "eos": eos,
        "unk": unk,
        "pad": pad,
        "start_of_turn": sot,
        "end_of_turn": eot,
        "stop": _stop_list(eos, eot, *from_configs("eos_token_id")),
        "add_bos": add_bos,
    }
    return kind, data, special


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
        with its control symbols typed CONTROL, see `_plain_text_model`)."""
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
