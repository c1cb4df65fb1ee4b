"""Conversion-time tokenizer building: the ``(kind, data, special)`` a bundle stores, from a
GGUF vocabulary (:func:`tokenizer_from_gguf`) or a Hugging Face checkpoint directory
(:func:`tokenizer_from_hf_dir`), and :func:`_build_spm_model`, which serializes a vocabulary as
a SentencePiece BPE model in edgelm's form. The blob formats are described in
:mod:`edgelm.tokenizer.runtime`.

Only conversion (``edgelm.convert``, ``edgelm.models.synthetic``) imports this module; the
runtime never does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import FormatError
from .runtime import KIND_HF_JSON, KIND_SENTENCEPIECE, _make_backend, _stop_list
from .wire import (
    _CONTROL,
    _MP_NORMALIZER,
    _MP_TRAINER,
    _NORMAL,
    _UNKNOWN,
    _USER_DEFINED,
    SPIECE_UNDERLINE,
    _ld,
    _normalize_spm_model,
    _normalizer_spec,
    _piece_msg,
    _trainer_spec,
)

__all__ = ["tokenizer_from_gguf", "tokenizer_from_hf_dir"]


def _special(bos, eos, unk, pad, sot, eot, add_bos: bool, *more_stops) -> dict:
    """The bundle's special-token record; generation stops at EOS, end-of-turn and `more_stops`."""
    return {"bos": bos, "eos": eos, "unk": unk, "pad": pad, "start_of_turn": sot, "end_of_turn": eot,
            "stop": _stop_list(eos, eot, *more_stops), "add_bos": add_bos}


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
    """Serialize a BPE ModelProto (trainer spec first, see :mod:`edgelm.tokenizer.runtime`).

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

# --------------------------------------------------------------------------------------------
# GGUF metadata
# --------------------------------------------------------------------------------------------

def _read_gguf_metadata_file(path: str | os.PathLike) -> dict[str, Any]:
    """GGUF metadata keys `general.*` and `tokenizer.*`, read straight from the file
    (edgelm/gguf_file.py: ~0.3 s for a 262k vocab, where `gguf.GGUFReader` takes >10 s)."""
    from ..gguf_file import read_gguf

    md = read_gguf(path, tensors=False).metadata
    return {k: v for k, v in md.items() if k.startswith("tokenizer.") or k.startswith("general.")}


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


def tokenizer_from_gguf(reader) -> tuple[str, bytes, dict]:
    """(kind, data, special) for the tokenizer a GGUF describes.

    `reader` is a path to the GGUF file, an `edgelm.gguf_file.GGUFFile` (both read directly,
    much faster than constructing a GGUFReader), or a `gguf.GGUFReader`.
    """
    if isinstance(reader, (str, os.PathLike)):
        md = _read_gguf_metadata_file(reader)
        where = str(reader)
    elif hasattr(reader, "metadata") and hasattr(reader, "path"):  # a GGUFFile
        md, where = reader.metadata, str(reader.path)
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
    special = _special(bos, eos, unk, pad, sot, eot, bool(md.get("tokenizer.ggml.add_bos_token", True)),
                       tok_id("eot_token_id", None), tok_id("eom_token_id", None))
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
    special = _special(bos, eos, unk, pad, sot, eot, add_bos, *from_configs("eos_token_id"))
    return kind, data, special
