"""Minimal protobuf wire format for SentencePiece ``ModelProto`` blobs (no protobuf dependency).

Varints and field iteration, the field numbers and piece types of ``sentencepiece_model.proto``,
and the helpers that write pieces, trainer and normalizer specs and that read and rewrite a
model into edgelm's form: the trainer spec first, marked with ``_EDGELM_MARK`` and listing the
control symbols (:func:`_is_edgelm_form`, :func:`_control_symbols`, :func:`_normalize_spm_model`,
:func:`_plain_text_model`). The form itself is described in :mod:`edgelm.tokenizer.runtime`.
Used both at run time (loading a foreign ``tokenizer.model``) and by
:mod:`edgelm.tokenizer.build`.
"""

from __future__ import annotations

import struct
from typing import Iterable

from ..errors import FormatError

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
