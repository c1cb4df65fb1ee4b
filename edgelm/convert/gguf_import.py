"""Import a GGUF file (llama.cpp's format) as a conversion Source.

Any tensor type the `gguf` package can dequantize is accepted. Q4_0 and Q8_0 blocks map
onto edgelm's int4-b32 and int8-b32 layouts byte for byte, so they pass through without
requantizing when the target scheme is that one (this is how QAT int4 checkpoints arrive).
llama.cpp's converter already folds Gemma's 1+w into norm weights, so norms load as-is.
The tensors read, their shapes and kinds come from the model file's tensor table
(edgelm/models/<arch>.py, with its GGUF_NAMES where GGUF names differ from the canonical ones).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..models import gemma3
from ..models._config import layer_pattern
from .common import Source, SourceTensor

GEMMA3 = gemma3.ARCH


def _open(path: Path):
    from ..gguf_file import read_gguf

    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, not a GGUF file")
    return read_gguf(path)


def _field(reader, key, default=None):
    """A scalar or string metadata value (an array where one is expected is damage)."""
    v = reader.metadata.get(key)
    if v is None:
        return default
    if isinstance(v, (list, np.ndarray)):
        raise FormatError(f"{reader.path}: GGUF field {key!r} is an array; edgelm expects a single value")
    return v


def _gemma3_config(reader, path: Path) -> dict:
    a = GEMMA3

    def req(key):
        v = _field(reader, f"{a}.{key}")
        if v is None:
            raise FormatError(f"{path}: GGUF field {a}.{key} is missing")
        return v

    def positive(key):
        v = req(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or not 0 < v < 2**31:
            raise FormatError(f"{path}: GGUF field {a}.{key} must be a positive integer, got {v!r:.80}")
        return int(v)

    layers = positive("block_count")
    hidden = positive("embedding_length")
    heads = positive("attention.head_count")
    positive("feed_forward_length")
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // heads))
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise FormatError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(emb.shape[1])
    every = gemma3.GLOBAL_EVERY
    pattern = int(_field(reader, f"{a}.attention.sliding_window_pattern", every) or every)
    scaling_type = _field(reader, f"{a}.rope.scaling.type")
    factor = float(_field(reader, f"{a}.rope.scaling.factor", 1.0) or 1.0)
    if scaling_type not in (None, "none", "linear"):
        raise FormatError(f"{path}: GGUF field {a}.rope.scaling.type={scaling_type!r} is not supported (linear only)")
    if scaling_type in (None, "none"):
        factor = 1.0
    # llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B geometry.
    qscale = hidden / heads if layers == 62 else head_dim
    softcap = _field(reader, f"{a}.final_logit_softcapping")
    attn_softcap = _field(reader, f"{a}.attn_logit_softcapping")
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": int(_field(reader, f"{a}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 1_000_000.0)),
        "rope_local_theta": 10_000.0,
        "rope_scaling_factor": factor,
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window", 512)),
        "layer_types": list(layer_pattern(layers, pattern)),
        "query_pre_attn_scalar": float(qscale),
        "final_logit_softcap": float(softcap) if softcap else None,
        "attn_logit_softcap": float(attn_softcap) if attn_softcap else None,
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 32768)),
    }
    try:  # the model's own invariants, checked before any tensor is read
        gemma3.Gemma3Config.from_dict(config)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    return config


# GGUF architecture -> (model module, config reader)
READERS = {GEMMA3: (gemma3, _gemma3_config)}
SUPPORTED_ARCHS = tuple(READERS)


def _tensor_loaders(t):
    """(load fp32, passthrough) for a GGUF tensor. Numpy shape is [rows, cols]."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    qtype = t.tensor_type
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 (cols) first

    def load():
        if qtype == Q.F32:
            a = np.asarray(t.data, dtype=np.float32)
        elif qtype == Q.F16:
            a = np.asarray(t.data).astype(np.float32)
        elif qtype == Q.BF16:
            a = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = dequantize(t.data, qtype)
        return np.ascontiguousarray(a, dtype=np.float32).reshape(shape)

    passthrough = None
    if len(shape) == 2 and qtype in (Q.Q4_0, Q.Q8_0):
        rows, cols = shape
        nb = cols // 32

        if qtype == Q.Q4_0:
            def parts():
                raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, nb, 18)
                return {"q": np.ascontiguousarray(raw[:, :, 2:]).reshape(rows, cols // 2),
                        "scale": np.ascontiguousarray(raw[:, :, :2]).view(np.float16).reshape(rows, nb)}
            passthrough = ("int4-b32", parts)
        else:
            def parts():
                raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, nb, 34)
                return {"q": np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).reshape(rows, cols),
                        "scale": np.ascontiguousarray(raw[:, :, :2]).view(np.float16).reshape(rows, nb)}
            passthrough = ("int8-b32", parts)
    return shape, load, passthrough


def load_gguf_source(path: str | os.PathLike) -> Source:
    path = Path(path)
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported (edgelm converts: {', '.join(SUPPORTED_ARCHS)})")
    model, read_config = READERS[arch]
    config = read_config(reader, path)

    from ..tokenizer.build import tokenizer_from_gguf

    tok_kind, tok_data, special = tokenizer_from_gguf(reader)

    by_name = {t.name: t for t in reader.tensors}
    table = model.tensor_table(model.Config.from_dict(config))
    # the global tensors first, then the blocks'
    wanted = sorted(table, key=lambda name: table[name].layer is not None)
    tensors, read = [], set()
    for name in wanted:
        gguf_name = model.GGUF_NAMES.get(name, name)
        t = by_name.get(gguf_name)
        if t is None:
            raise FormatError(f"{path}: tensor {gguf_name} is missing")
        read.add(gguf_name)
        shape, load, passthrough = _tensor_loaders(t)
        tensors.append(SourceTensor(name, shape, table[name].kind, load, passthrough, t.tensor_type.name))
    for st in tensors:
        if tuple(st.shape) != table[st.name].shape:
            raise FormatError(f"{path}: tensor {model.GGUF_NAMES.get(st.name, st.name)} has shape {list(st.shape)}, "
                              f"config implies {list(table[st.name].shape)}")
    extra = sorted(set(by_name) - read)
    notes = [f"ignored GGUF tensors: {', '.join(extra)}"] if extra else []
    return Source(
        arch=model.ARCH,
        config=config,
        tensors=tensors,
        tokenizer_kind=tok_kind,
        tokenizer_data=tok_data,
        special_tokens=special,
        chat_template=_field(reader, "tokenizer.chat_template"),
        description={"format": "gguf", "path": str(path), "name": _field(reader, "general.name"),
                     "file_type": _field(reader, "general.file_type")},
        add_bos=bool(special.get("add_bos", True)),
        notes=notes,
        input_files=[path],
    )
