"""Import a Hugging Face Gemma 3 or Gemma 3n text checkpoint directory as a conversion `Source`.

(Gemma 3n, model types gemma3n_text / gemma3n, is handled in the section at the end of
this file; the rest of this docstring describes Gemma 3.)

A checkpoint directory holds config.json, one or more *.safetensors files (optionally
with model.safetensors.index.json) and the tokenizer files. Two model types are read:

  gemma3_text  Gemma3ForCausalLM (1B, 270M, ...): weights under `model.`
  gemma3       Gemma3ForConditionalGeneration (4B, 12B, 27B): the text decoder is taken
               from `text_config` and weights under `language_model.model.` (what
               transformers writes to disk, all versions so far) or
               `model.language_model.` (its in-memory naming since 4.52); the vision
               tower and multi-modal projector are skipped with a note.

Tensors are read lazily with our own safetensors header parser (numpy has no bfloat16,
and `safe_open(framework="numpy")` refuses BF16): every loader reads one tensor's bytes,
widens F16/BF16 to float32 exactly (BF16 by shifting into the high 16 bits), and folds
Gemma's `1 + w` into every RMSNorm weight. The source directory is only ever read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FormatError
from ..models.gemma3 import ARCH, GLOBAL, LOCAL, Gemma3Config, default_layer_types, tensor_shapes
from .common import Source, SourceTensor

# Gemma3TextConfig's defaults: hub configs (e.g. gemma-3-4b-it's text_config) omit
# every field that equals its default, so a missing field means this value.
TEXT_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}
_REPORT_DEFAULTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                    "query_pre_attn_scalar")

SUPPORTED_ARCHITECTURES = {
    "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3ForConditionalGeneration", "Gemma3Model",
}

# Prefixes in front of the text decoder's own names (embed_tokens, layers.N..., norm).
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.", "vision_model.")

# HF per-layer name -> (canonical per-layer name, kind)
_LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm.weight", "norm"),
    "self_attn.q_proj.weight": ("attn_q.weight", "linear"),
    "self_attn.k_proj.weight": ("attn_k.weight", "linear"),
    "self_attn.v_proj.weight": ("attn_v.weight", "linear"),
    "self_attn.q_norm.weight": ("attn_q_norm.weight", "norm"),
    "self_attn.k_norm.weight": ("attn_k_norm.weight", "norm"),
    "self_attn.o_proj.weight": ("attn_output.weight", "linear"),
    "post_attention_layernorm.weight": ("post_attention_norm.weight", "norm"),
    "pre_feedforward_layernorm.weight": ("ffn_norm.weight", "norm"),
    "mlp.gate_proj.weight": ("ffn_gate.weight", "linear"),
    "mlp.up_proj.weight": ("ffn_up.weight", "linear"),
    "mlp.down_proj.weight": ("ffn_down.weight", "linear"),
    "post_feedforward_layernorm.weight": ("post_ffw_norm.weight", "norm"),
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_MAX_ST_HEADER = 100 * 1024 * 1024


# ----------------------------------------------------------------------------- safetensors


class _STEntry:
    __slots__ = ("file", "name", "dtype", "shape", "start", "nbytes")

    def __init__(self, file: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.file, self.name, self.dtype, self.shape, self.start, self.nbytes = file, name, dtype, shape, start, nbytes

    def read(self) -> np.ndarray:
        """The tensor as a float32 array (a fresh, writable copy)."""
        dt = _ST_DTYPES[self.dtype]
        count = self.nbytes // dt.itemsize
        try:
            with open(self.file, "rb") as f:
                f.seek(self.start)
                raw = np.fromfile(f, dtype=dt, count=count)
        except OSError as e:
            raise FormatError(f"{self.file}: cannot read tensor {self.name} ({e.strerror})") from None
        if raw.size != count:
            raise FormatError(f"{self.file}: truncated: tensor {self.name} needs {self.nbytes} bytes, found {raw.size * dt.itemsize}")
        if self.dtype == "BF16":
            # bfloat16 is the high half of a float32: widening is exact (NaN payloads included)
            w = raw.astype(np.uint32)
            w <<= np.uint32(16)
            out = w.view(np.float32)
        elif raw.dtype == np.float32:
            out = raw  # "<f4" on a little-endian host: already a private float32 copy
        else:
            out = raw.astype(np.float32)  # F16 widens exactly; F64 narrows
        return out.reshape(self.shape)

    def read_raw(self, lo: int, hi: int) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.start + lo)
            return f.read(hi - lo)


def read_safetensors_header(file: Path) -> dict[str, _STEntry]:
    """Parse and validate a safetensors file's header; tensor data is not read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"{file}: corrupt safetensors file (only {size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen == 0 or hlen > _MAX_ST_HEADER or 8 + hlen > size:
                raise FormatError(f"{file}: corrupt safetensors header (header length {hlen} does not fit in {size} bytes)")
            raw = f.read(hlen)
    except OSError as e:
        raise FormatError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{file}: corrupt safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + hlen
    data_size = size - data_start
    entries: dict[str, _STEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"{file}: corrupt safetensors header (entry {name!r} is not an object)")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid shape {shape!r})")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid data_offsets {offs!r})")
        if offs[1] > data_size:
            raise FormatError(f"{file}: truncated: tensor {name} ends at byte {offs[1]} of a {data_size}-byte data section")
        if not isinstance(dtype, str):
            raise FormatError(f"{file}: corrupt safetensors header (tensor {name}: invalid dtype {dtype!r})")
        if dtype in _ST_DTYPES:
            expect = _ST_DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
            if offs[1] - offs[0] != expect:
                raise FormatError(
                    f"{file}: corrupt safetensors header (tensor {name}: {offs[1] - offs[0]} bytes for {dtype}{shape}, expected {expect})"
                )
        entries[name] = _STEntry(file, name, dtype, tuple(shape), data_start + offs[0], offs[1] - offs[0])
    return entries


# ----------------------------------------------------------------------------- config


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return d


def _check_num(v, key: str, where: str, kind=int, allow_none: bool = False):
    if v is None and allow_none:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and kind is int:
        ok = float(v).is_integer()
    if not ok:
        raise FormatError(f"{where}: field {key!r} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


def _num(d: dict, key: str, where: str, kind=int, allow_none: bool = False):
    """d[key] (or transformers' default when absent), checked."""
    return _check_num(d.get(key, TEXT_DEFAULTS.get(key)), key, where, kind, allow_none)


def _rope_entry(p, field: str, where: str) -> tuple[str, float | None, float]:
    """(rope type, theta or None, linear factor) of one RoPE parameter dict."""
    if p is None:
        return "default", None, 1.0
    if not isinstance(p, dict):
        raise FormatError(f"{where}: field {field!r} must be an object, got {p!r}")
    rtype = p.get("rope_type", p.get("type", "default"))
    theta = p.get("rope_theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0):
        raise FormatError(f"{where}: field '{field}.rope_theta' must be a positive number, got {theta!r}")
    if rtype == "default":
        return "default", theta, 1.0
    if rtype == "linear":
        factor = p.get("factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise FormatError(f"{where}: field '{field}.factor' must be a positive number, got {factor!r}")
        return "linear", theta, float(factor)
    raise FormatError(
        f"{where}: field '{field}.rope_type' is {rtype!r}; edgelm supports only 'default' and 'linear' RoPE for Gemma 3"
    )


def _rope(tc: dict, where: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from either config style."""
    theta_g = tc.get("rope_theta", TEXT_DEFAULTS["rope_theta"])
    theta_l = tc.get("rope_local_base_freq", TEXT_DEFAULTS["rope_local_base_freq"])
    factor = 1.0
    rp = tc.get("rope_parameters")
    if rp is not None:
        # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}
        if not isinstance(rp, dict) or not ({"full_attention", "sliding_attention"} & set(rp)):
            raise FormatError(
                f"{where}: field 'rope_parameters' must be keyed by layer type ('full_attention', 'sliding_attention'), got {rp!r}"
            )
        extra = set(rp) - {"full_attention", "sliding_attention"}
        if extra:
            raise FormatError(f"{where}: field 'rope_parameters' has unknown layer types {sorted(extra)}")
        gtype, gtheta, factor = _rope_entry(rp.get("full_attention"), "rope_parameters.full_attention", where)
        ltype, ltheta, lfactor = _rope_entry(rp.get("sliding_attention"), "rope_parameters.sliding_attention", where)
        if lfactor != 1.0:
            raise FormatError(
                f"{where}: field 'rope_parameters.sliding_attention' uses linear scaling (factor {lfactor}); "
                "edgelm scales only global layers"
            )
        theta_g = gtheta if gtheta is not None else theta_g
        theta_l = ltheta if ltheta is not None else theta_l
    elif tc.get("rope_scaling") is not None:
        # transformers 4: scaling applies to the global (full attention) layers only
        _, _, factor = _rope_entry(tc["rope_scaling"], "rope_scaling", where)
    for key, v in (("rope_theta", theta_g), ("rope_local_base_freq", theta_l)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise FormatError(f"{where}: field {key!r} must be a positive number, got {v!r}")
    return float(theta_g), float(theta_l), float(factor)


def _layer_types(tc: dict, n_layers: int, where: str) -> tuple[str, ...]:
    lt = tc.get("layer_types")
    if lt is not None:
        if not isinstance(lt, list):
            raise FormatError(f"{where}: field 'layer_types' must be a list, got {lt!r}")
        names = {"sliding_attention": LOCAL, "full_attention": GLOBAL}
        bad = sorted({str(t) for t in lt if t not in names})
        if bad:
            raise FormatError(f"{where}: field 'layer_types' has unsupported entries {bad} (expected sliding_attention/full_attention)")
        if len(lt) != n_layers:
            raise FormatError(f"{where}: field 'layer_types' has {len(lt)} entries for {n_layers} layers")
        return tuple(names[t] for t in lt)
    pattern = tc.get("sliding_window_pattern", tc.get("_sliding_window_pattern", 6))
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
        raise FormatError(f"{where}: field 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
    return default_layer_types(n_layers, pattern)


def text_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[dict, dict, list[str]]:
    """HF config.json dict -> (edgelm Gemma3Config dict, the HF text config, notes)."""
    notes: list[str] = []
    model_type = cfg.get("model_type")
    if model_type == "gemma3_text":
        tc = cfg
    elif model_type == "gemma3":
        tc = cfg.get("text_config")
        if tc is None:
            tc = {}
            notes.append("config: no text_config; using transformers' Gemma3TextConfig defaults")
        if not isinstance(tc, dict):
            raise FormatError(f"{where}: field 'text_config' must be an object")
        where = f"{where} text_config"
        if tc.get("model_type", "gemma3_text") != "gemma3_text":
            raise FormatError(f"{where}: model_type {tc.get('model_type')!r} is not supported (expected gemma3_text)")
    elif model_type is None:
        raise FormatError(f"{where}: no 'model_type' field; edgelm imports Gemma 3 (gemma3_text, gemma3)")
    else:
        raise FormatError(
            f"{where}: model_type {model_type!r} is not supported; edgelm imports Gemma 3 checkpoints (gemma3_text, gemma3)"
        )
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs:
            raise FormatError(f"{where}: field 'architectures' must be a non-empty list")
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise FormatError(
                f"{where}: architecture {bad[0]!r} is not supported (expected one of {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )

    act = tc.get("hidden_activation", tc.get("hidden_act", TEXT_DEFAULTS["hidden_activation"]))
    if act != "gelu_pytorch_tanh":
        raise FormatError(f"{where}: field 'hidden_activation' is {act!r}; Gemma 3 uses 'gelu_pytorch_tanh'")
    if tc.get("attention_bias", False):
        raise FormatError(f"{where}: field 'attention_bias' is true; edgelm's Gemma 3 has no attention biases")
    if tc.get("use_bidirectional_attention", False):
        raise FormatError(f"{where}: field 'use_bidirectional_attention' is true (an embedding model); edgelm runs causal decoders")
    if tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)) is False:
        raise FormatError(f"{where}: field 'tie_word_embeddings' is false; edgelm's Gemma 3 ties the output head to the embedding")

    missing = [k for k in _REPORT_DEFAULTS if k not in tc]
    if missing and model_type == "gemma3" and tc:
        notes.append(f"config: text_config omits {', '.join(missing)}; using transformers' Gemma3TextConfig defaults")

    n_layers = _num(tc, "num_hidden_layers", where)
    hidden = _num(tc, "hidden_size", where)
    heads = _num(tc, "num_attention_heads", where)
    head_dim = tc.get("head_dim", TEXT_DEFAULTS["head_dim"])
    if head_dim is None:  # transformers then uses hidden_size // num_attention_heads
        head_dim = hidden // heads if heads > 0 else 0
    head_dim = _check_num(head_dim, "head_dim", where)
    layer_types = _layer_types(tc, n_layers, where)
    sw = tc.get("sliding_window", TEXT_DEFAULTS["sliding_window"])
    if sw is None:
        if LOCAL in layer_types:
            raise FormatError(f"{where}: field 'sliding_window' is null but the model has sliding-window layers")
        sw = 0
    sw = _check_num(sw, "sliding_window", where)
    if LOCAL in layer_types and sw <= 0:
        raise FormatError(f"{where}: field 'sliding_window' must be positive, got {sw}")
    theta_g, theta_l, factor = _rope(tc, where)
    attn_cap = _num(tc, "attn_logit_softcapping", where, float, allow_none=True)
    if attn_cap is not None:
        notes.append(f"config: attn_logit_softcapping={attn_cap:g} dropped; Gemma 3 (and transformers) never applies it")
    out = {
        "vocab_size": _num(tc, "vocab_size", where),
        "hidden_size": hidden,
        "intermediate_size": _num(tc, "intermediate_size", where),
        "num_layers": n_layers,
        "num_heads": heads,
        "num_kv_heads": _num(tc, "num_key_value_heads", where),
        "head_dim": head_dim,
        "rms_norm_eps": _num(tc, "rms_norm_eps", where, float),
        "rope_theta": theta_g,
        "rope_local_theta": theta_l,
        "rope_scaling_factor": factor,
        "sliding_window": sw,
        "layer_types": list(layer_types),
        "query_pre_attn_scalar": _num(tc, "query_pre_attn_scalar", where, float),
        "final_logit_softcap": _num(tc, "final_logit_softcapping", where, float, allow_none=True),
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (Gemma 3
        # replaced it with QK-norm), so the checkpoint means "no attention softcap".
        "attn_logit_softcap": None,
        "max_position_embeddings": _num(tc, "max_position_embeddings", where),
    }
    try:
        out = Gemma3Config.from_dict(out).to_dict()
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    return out, tc, notes


def expected_shapes(c: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind), in bundle order, of the Gemma 3 config dict `c`."""
    return tensor_shapes(Gemma3Config.from_dict(c))


# ----------------------------------------------------------------------------- names


def canonical_name(hf_name: str) -> tuple[str, str | None]:
    """Classify an HF tensor name: ("text", canonical) / ("lm_head", None) /
    ("vision", None) / ("unknown", None)."""
    if hf_name in _LM_HEAD:
        return "lm_head", None
    if hf_name.startswith(_VISION_PREFIXES):
        return "vision", None
    rest = hf_name
    for p in _TEXT_PREFIXES:
        if hf_name.startswith(p):
            rest = hf_name[len(p):]
            break
    if rest == "embed_tokens.weight":
        return "text", "token_embd.weight"
    if rest == "norm.weight":
        return "text", "output_norm.weight"
    m = _LAYER_RE.match(rest)
    if m and m.group(2) in _LAYER_MAP:
        return "text", f"blk.{int(m.group(1))}.{_LAYER_MAP[m.group(2)][0]}"
    return "unknown", None


def hf_suffix(canonical: str) -> str:
    """The HF name (without its model prefix) of a canonical tensor name."""
    if canonical == "token_embd.weight":
        return "embed_tokens.weight"
    if canonical == "output_norm.weight":
        return "norm.weight"
    _, n, rest = canonical.split(".", 2)
    hf = next(k for k, (v, _) in _LAYER_MAP.items() if v == rest)
    return f"layers.{n}.{hf}"


# ----------------------------------------------------------------------------- loading


def _weight_files(d: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        idx = _read_json(index, "safetensors index")
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise FormatError(f"{index}: field 'weight_map' is missing or invalid")
        files = []
        for fname in dict.fromkeys(wm.values()):
            p = d / fname
            if Path(fname).name != fname or not p.is_file():
                raise FormatError(f"{index}: shard {fname!r} is missing from {d}")
            files.append(p)
        return files, wm
    files = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not files:
        if any(d.glob("*.bin")) or any(d.glob("*.pt")) or any(d.glob("*.pth")):
            raise FormatError(f"{d}: no *.safetensors files (only PyTorch pickles, which edgelm does not read; re-save with safe_serialization=True)")
        raise FormatError(f"{d}: no *.safetensors files in the checkpoint directory")
    return files, None


def _same_tensor(a: _STEntry, b: _STEntry, chunk: int = 1 << 24) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        for lo in range(0, a.nbytes, chunk):
            hi = min(lo + chunk, a.nbytes)
            if a.read_raw(lo, hi) != b.read_raw(lo, hi):
                return False
        return True
    return bool(np.array_equal(a.read(), b.read()))


def _chat_template(d: Path, tok_cfg: dict | None) -> str | None:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{jinja}: cannot read chat template ({e})") from None
    if tok_cfg is not None:
        t = tok_cfg.get("chat_template")
        if isinstance(t, str):
            return t
        if isinstance(t, list):  # [{"name": "default", "template": "..."}, ...]
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    cj = d / "chat_template.json"
    if cj.is_file():
        t = _read_json(cj, "chat template").get("chat_template")
        if isinstance(t, str):
            return t
    return None


def _make_loader(e: _STEntry, kind: str) -> Callable[[], np.ndarray]:
    if kind == "norm":
        def load() -> np.ndarray:
            w = e.read()
            w += np.float32(1.0)  # Gemma's RMSNorm scales by (1 + w); store 1 + w
            return w
    else:
        def load() -> np.ndarray:
            return e.read()
    return load


def _read_entries(d: Path) -> tuple[list[Path], dict[str, str] | None, dict[str, _STEntry]]:
    """The directory's safetensors files, index and every tensor's header entry."""
    files, weight_map = _weight_files(d)
    entries: dict[str, _STEntry] = {}
    for f in files:
        for name, e in read_safetensors_header(f).items():
            if name in entries:
                raise FormatError(f"{d}: tensor {name} appears in both {entries[name].file.name} and {f.name}")
            entries[name] = e
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in entries or entries[name].file.name != fname:
                raise FormatError(f"{d / 'model.safetensors.index.json'}: tensor {name} is not in its shard {fname}")
    return files, weight_map, entries


def load_hf_source(path: str | os.PathLike) -> Source:
    """Read a Hugging Face Gemma 3 or Gemma 3n checkpoint directory (never modified)."""
    d = Path(path)
    if not d.exists():
        raise FormatError(f"{d}: no such directory")
    if not d.is_dir():
        raise FormatError(f"{d}: not a directory; pass the Hugging Face checkpoint directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no config.json — not a Hugging Face checkpoint directory")
    raw_cfg = _read_json(cfg_path, "config")
    if raw_cfg.get("model_type") in GEMMA3N_MODEL_TYPES:
        return load_gemma3n_source(d, raw_cfg)
    config, tc, notes = text_config_from_hf(raw_cfg, str(cfg_path))

    files, weight_map, entries = _read_entries(d)

    expected = expected_shapes(config)
    found: dict[str, _STEntry] = {}
    hf_of: dict[str, str] = {}
    lm_head: _STEntry | None = None
    vision: list[str] = []
    for name, e in entries.items():
        cls, canon = canonical_name(name)
        if cls == "vision":
            vision.append(name)
            continue
        if cls == "lm_head":
            lm_head = e
            continue
        if cls == "unknown" or canon not in expected:
            raise FormatError(f"{e.file}: unexpected tensor {name} (not part of a Gemma 3 text decoder with {config['num_layers']} layers)")
        if canon in found:
            raise FormatError(f"{d}: tensors {hf_of[canon]} and {name} both map to {canon}")
        shape, _ = expected[canon]
        if e.dtype not in _ST_DTYPES:
            raise FormatError(f"{e.file}: tensor {name} has dtype {e.dtype}; edgelm imports F32, F16 and BF16 checkpoints")
        if tuple(e.shape) != shape:
            raise FormatError(f"{e.file}: tensor {name} has shape {list(e.shape)}, config.json implies {list(shape)}")
        found[canon] = e
        hf_of[canon] = name
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{d}: missing tensor {missing[0]} ({hf_suffix(missing[0])}){more} for a "
                          f"{config['num_layers']}-layer Gemma 3")
    if vision:
        notes.append(f"skipped {len(vision)} vision tower / multi-modal projector tensors (text-only import)")
    if lm_head is not None:
        emb = found["token_embd.weight"]
        if lm_head.dtype in _ST_DTYPES and _same_tensor(lm_head, emb):
            pass  # a saved copy of the tied embedding
        else:
            notes.append(f"{lm_head.name} differs from the embedding and was ignored: Gemma 3 ties the output head to token_embd")

    tensors = [SourceTensor(name=k, shape=shape, kind=kind, load=_make_loader(found[k], kind), source_type=found[k].dtype)
               for k, (shape, kind) in expected.items()]

    from ..runtime.tokenizer import tokenizer_from_hf_dir  # imported late: optional at import time

    tok_kind, tok_data, special = tokenizer_from_hf_dir(d)
    tok_cfg_path = d / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, "tokenizer config") if tok_cfg_path.is_file() else None
    chat_template = _chat_template(d, tok_cfg)

    dtypes = sorted({e.dtype for e in found.values()})
    description = _description(d, raw_cfg, files, dtypes)
    return Source(
        arch=ARCH,
        config=config,
        tensors=tensors,
        tokenizer_kind=tok_kind,
        tokenizer_data=tok_data,
        special_tokens=special,
        chat_template=chat_template,
        description=description,
        add_bos=bool(special.get("add_bos", True)),
        notes=notes,
        input_files=_input_files(d, files),
    )


# ============================================================================= Gemma 3n
#
# model_type gemma3n_text (Gemma3nForCausalLM: weights under `model.`) or gemma3n
# (Gemma3nForConditionalGeneration: the decoder from `text_config`, weights under
# `model.language_model.`; the vision and audio towers and their embedders are skipped
# with a note). Gemma 3n's RMSNorm multiplies by w itself, so norms are copied unchanged.
# Names and numerics: edgelm/models/gemma3n.py.

GEMMA3N_MODEL_TYPES = ("gemma3n", "gemma3n_text")
GEMMA3N_ARCHITECTURES = {
    "gemma3n_text": {"Gemma3nForCausalLM", "Gemma3nTextModel"},
    "gemma3n": {"Gemma3nForConditionalGeneration", "Gemma3nModel", "Gemma3nForCausalLM"},
}
# Gemma3nTextConfig's defaults (the E4B geometry): a field a config omits has this value.
GEMMA3N_TEXT_DEFAULTS = {
    "vocab_size": 262_400,
    "hidden_size": 2048,
    "intermediate_size": 16_384,
    "num_hidden_layers": 35,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32_768,
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "final_logit_softcapping": 30.0,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "altup_active_idx": 0,
    "altup_correct_scale": True,
    "altup_num_inputs": 4,
    "num_kv_shared_layers": 15,
    "laurel_rank": 64,
}
_GEMMA3N_SKIP_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                          "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
_GEMMA3N_GLOBALS = {
    "embed_tokens.weight": "token_embd.weight",
    "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
    "norm.weight": "output_norm.weight",
}
_GEMMA3N_STACKED = {"altup_projections": "altup_proj.weight", "altup_unembed_projections": "altup_unembd_proj.weight"}
_GEMMA3N_STACKED_RE = re.compile(r"^(altup_projections|altup_unembed_projections)\.(\d+)\.weight$")
_GEMMA3N_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm",
    "self_attn.o_proj.weight": "attn_output",
    "post_attention_layernorm.weight": "post_attention_norm",
    "pre_feedforward_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
    "post_feedforward_layernorm.weight": "post_ffw_norm",
    "altup.prediction_coefs.weight": "altup_predict_coef",
    "altup.correction_coefs.weight": "altup_correct_coef",
    "altup.modality_router.weight": "altup_router",
    "altup.router_norm.weight": "altup_router_norm",
    "altup.correct_output_scale": "altup_correct_scale",
    "laurel.linear_left.weight": "laurel_l",
    "laurel.linear_right.weight": "laurel_r",
    "laurel.post_laurel_norm.weight": "laurel_post_norm",
    "per_layer_input_gate.weight": "inp_gate",
    "per_layer_projection.weight": "proj",
    "post_per_layer_input_norm.weight": "post_norm",
}
_GEMMA3N_KV_ONLY = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight",
                    "self_attn.v_norm.weight")


def gemma3n_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[dict, dict, list[str]]:
    """HF Gemma 3n config.json dict -> (edgelm Gemma3nConfig dict, the HF text config, notes)."""
    from ..models.gemma3n import Gemma3nConfig

    notes: list[str] = []
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs:
            raise FormatError(f"{where}: field 'architectures' must be a non-empty list")
        ok = GEMMA3N_ARCHITECTURES[model_type]
        bad = [a for a in archs if a not in ok]
        if bad:
            raise FormatError(f"{where}: architecture {bad[0]!r} does not match model_type {model_type!r} "
                              f"(expected one of {', '.join(sorted(ok))})")
    if model_type == "gemma3n":
        tc = cfg.get("text_config")
        if tc is None:
            tc = {}
            notes.append("config: no text_config; using transformers' Gemma3nTextConfig defaults (E4B)")
        if not isinstance(tc, dict):
            raise FormatError(f"{where}: field 'text_config' must be an object")
        where = f"{where} text_config"
        if tc.get("model_type", "gemma3n_text") != "gemma3n_text":
            raise FormatError(f"{where}: model_type {tc.get('model_type')!r} is not supported (expected gemma3n_text)")
    else:
        tc = cfg

    def get(key, kind=int, allow_none=False):
        return _check_num(tc.get(key, GEMMA3N_TEXT_DEFAULTS.get(key)), key, where, kind, allow_none)

    act = tc.get("hidden_activation", tc.get("hidden_act", "gelu_pytorch_tanh"))
    if act != "gelu_pytorch_tanh":
        raise FormatError(f"{where}: field 'hidden_activation' is {act!r}; Gemma 3n uses 'gelu_pytorch_tanh'")
    if tc.get("attention_bias", False):
        raise FormatError(f"{where}: field 'attention_bias' is true; edgelm's Gemma 3n has no attention biases")
    if tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)) is False:
        raise FormatError(f"{where}: field 'tie_word_embeddings' is false; Gemma 3n ties the output head to the embedding")
    n_layers = get("num_hidden_layers")
    if n_layers <= 0:
        raise FormatError(f"{where}: field 'num_hidden_layers' must be positive, got {n_layers}")
    hidden = get("hidden_size")
    heads = get("num_attention_heads")
    head_dim = tc.get("head_dim", GEMMA3N_TEXT_DEFAULTS["head_dim"])
    if head_dim is None:
        head_dim = hidden // heads if heads > 0 else 0
    head_dim = _check_num(head_dim, "head_dim", where)

    inter = tc.get("intermediate_size", GEMMA3N_TEXT_DEFAULTS["intermediate_size"])
    if isinstance(inter, list):
        if len(inter) != n_layers:
            raise FormatError(f"{where}: field 'intermediate_size' has {len(inter)} entries for {n_layers} layers")
        inter = [_check_num(v, "intermediate_size", where) for v in inter]
    else:
        inter = [_check_num(inter, "intermediate_size", where)] * n_layers

    sparsity = tc.get("activation_sparsity_pattern")
    if sparsity is None:  # transformers: 0.95 on the first 10 layers of a model deeper than 10
        n_sparse = 10 if n_layers > 10 else 0
        sparsity = [0.95] * n_sparse + [0.0] * (n_layers - n_sparse)
    elif isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        sparsity = [float(sparsity)] * n_layers
    if not isinstance(sparsity, list) or len(sparsity) != n_layers:
        raise FormatError(f"{where}: field 'activation_sparsity_pattern' must list one value for each of {n_layers} layers")
    sparsity = [_check_num(v, "activation_sparsity_pattern", where, float) for v in sparsity]

    lt = tc.get("layer_types")
    layer_types = _layer_types(tc, n_layers, where) if lt is not None else tuple(
        GLOBAL if (i + 1) % 5 == 0 else LOCAL for i in range(n_layers))
    sw = _check_num(tc.get("sliding_window", GEMMA3N_TEXT_DEFAULTS["sliding_window"]), "sliding_window", where)
    theta_g, theta_l, factor = _rope(tc, where)
    correct_scale = tc.get("altup_correct_scale", True)
    if not isinstance(correct_scale, bool):
        raise FormatError(f"{where}: field 'altup_correct_scale' must be true or false, got {correct_scale!r}")
    out = {
        "vocab_size": get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_layers": n_layers,
        "num_heads": heads,
        "num_kv_heads": get("num_key_value_heads"),
        "head_dim": head_dim,
        "rms_norm_eps": get("rms_norm_eps", float),
        "rope_theta": theta_g,
        "rope_local_theta": theta_l,
        "rope_scaling_factor": factor,
        "sliding_window": sw,
        "layer_types": list(layer_types),
        "final_logit_softcap": get("final_logit_softcapping", float, allow_none=True),
        "max_position_embeddings": get("max_position_embeddings"),
        "vocab_size_per_layer_input": get("vocab_size_per_layer_input"),
        "hidden_size_per_layer_input": get("hidden_size_per_layer_input"),
        "altup_num_inputs": get("altup_num_inputs"),
        "altup_active_idx": get("altup_active_idx"),
        "altup_correct_scale": correct_scale,
        "num_kv_shared_layers": get("num_kv_shared_layers"),
        "laurel_rank": get("laurel_rank"),
        "activation_sparsity": sparsity,
    }
    try:
        out = Gemma3nConfig.from_dict(out).to_dict()
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    return out, tc, notes


def gemma3n_canonical_name(hf_name: str) -> tuple[str, str | None]:
    """Classify an HF Gemma 3n tensor name: ("text", canonical) / ("stacked", "altup_proj.weight:J") /
    ("lm_head", None) / ("skip", None) (vision/audio) / ("layer_kv", "N:canonical") / ("unknown", None)."""
    if hf_name in _LM_HEAD:
        return "lm_head", None
    if hf_name.startswith(_GEMMA3N_SKIP_PREFIXES):
        return "skip", None
    rest = hf_name
    for p in _TEXT_PREFIXES:
        if hf_name.startswith(p):
            rest = hf_name[len(p):]
            break
    if rest in _GEMMA3N_GLOBALS:
        return "text", _GEMMA3N_GLOBALS[rest]
    m = _GEMMA3N_STACKED_RE.match(rest)
    if m:
        return "stacked", f"{_GEMMA3N_STACKED[m.group(1)]}:{int(m.group(2))}"
    m = _LAYER_RE.match(rest)
    if m:
        n, tail = int(m.group(1)), m.group(2)
        if tail in _GEMMA3N_KV_ONLY:  # K/V weights: only layers before the KV-shared range use them
            canon = f"blk.{n}.{_GEMMA3N_LAYER_MAP[tail]}.weight" if tail in _GEMMA3N_LAYER_MAP else ""
            return "layer_kv", f"{n}:{canon}"
        if tail in _GEMMA3N_LAYER_MAP:
            return "text", f"blk.{n}.{_GEMMA3N_LAYER_MAP[tail]}.weight"
    return "unknown", None


def _stacked_loader(parts: list[_STEntry]) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        return np.concatenate([e.read() for e in parts], axis=0)
    return load


def load_gemma3n_source(d: Path, raw_cfg: dict) -> Source:
    """A Gemma 3n checkpoint directory (text decoder only) as a conversion Source."""
    from ..models.gemma3n import ARCH as ARCH3N
    from ..models.gemma3n import Gemma3nConfig, tensor_shapes

    cfg_path = d / "config.json"
    config, _, notes = gemma3n_config_from_hf(raw_cfg, str(cfg_path))
    cfg = Gemma3nConfig.from_dict(config)
    files, _, entries = _read_entries(d)
    expected = tensor_shapes(cfg)
    found: dict[str, _STEntry] = {}
    stacked: dict[str, dict[int, _STEntry]] = {v: {} for v in _GEMMA3N_STACKED.values()}
    skipped, shared_kv = [], []
    lm_head = None
    for name, e in entries.items():
        cls, canon = gemma3n_canonical_name(name)
        if cls == "skip":
            skipped.append(name)
            continue
        if cls == "lm_head":
            lm_head = e
            continue
        if e.dtype not in _ST_DTYPES:
            raise FormatError(f"{e.file}: tensor {name} has dtype {e.dtype}; edgelm imports F32, F16 and BF16 checkpoints")
        if cls == "layer_kv":
            n, canon = canon.split(":", 1)
            if cfg.first_kv_shared_layer <= int(n) < cfg.num_layers:
                shared_kv.append(name)  # real checkpoints keep K/V weights that shared layers never use
                continue
            if not canon:
                raise FormatError(f"{e.file}: unexpected tensor {name} (Gemma 3n's v-norm has no weight)")
            cls = "text"
        if cls == "stacked":
            base, j = canon.split(":")
            j = int(j)
            if not 0 <= j < cfg.altup_num_inputs - 1:
                raise FormatError(f"{e.file}: unexpected tensor {name} (altup_num_inputs is {cfg.altup_num_inputs})")
            if tuple(e.shape) != (cfg.hidden_size, cfg.hidden_size):
                raise FormatError(f"{e.file}: tensor {name} has shape {list(e.shape)}, config.json implies "
                                  f"{[cfg.hidden_size, cfg.hidden_size]}")
            stacked[base][j] = e
            continue
        if cls == "unknown" or canon not in expected:
            raise FormatError(f"{e.file}: unexpected tensor {name} (not part of a Gemma 3n text decoder with "
                              f"{cfg.num_layers} layers, {cfg.num_kv_shared_layers} of them KV-shared)")
        if canon in found:
            raise FormatError(f"{d}: tensors {found[canon].name} and {name} both map to {canon}")
        shape = expected[canon][0]
        if tuple(e.shape) != shape:
            raise FormatError(f"{e.file}: tensor {name} has shape {list(e.shape)}, config.json implies {list(shape)}")
        found[canon] = e
    tensors = []
    for canon, (shape, kind) in expected.items():
        if canon in stacked:
            got = stacked[canon]
            missing = [j for j in range(cfg.altup_num_inputs - 1) if j not in got]
            if missing:
                hf = "altup_projections" if canon == "altup_proj.weight" else "altup_unembed_projections"
                raise FormatError(f"{d}: missing tensor {hf}.{missing[0]}.weight for a Gemma 3n with "
                                  f"altup_num_inputs={cfg.altup_num_inputs}")
            parts = [got[j] for j in range(cfg.altup_num_inputs - 1)]
            tensors.append(SourceTensor(canon, shape, kind, _stacked_loader(parts), source_type=parts[0].dtype))
            continue
        if canon not in found:
            raise FormatError(f"{d}: missing tensor {canon} for a {cfg.num_layers}-layer Gemma 3n "
                              f"({cfg.num_kv_shared_layers} KV-shared layers)")
        e = found[canon]
        tensors.append(SourceTensor(canon, shape, kind, e.read, source_type=e.dtype))
    if skipped:
        notes.append(f"skipped {len(skipped)} vision/audio tower and multimodal embedder tensors (text-only import; "
                     "the towers come with their own issue)")
    if shared_kv:
        notes.append(f"ignored {len(shared_kv)} K/V tensors of KV-shared layers (they reuse earlier layers' caches)")
    if lm_head is not None:
        emb = found["token_embd.weight"]
        if not (lm_head.dtype in _ST_DTYPES and _same_tensor(lm_head, emb)):
            notes.append(f"{lm_head.name} differs from the embedding and was ignored: Gemma 3n ties the output head to token_embd")

    from ..runtime.tokenizer import tokenizer_from_hf_dir

    tok_kind, tok_data, special = tokenizer_from_hf_dir(d)
    tok_cfg_path = d / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path, "tokenizer config") if tok_cfg_path.is_file() else None
    dtypes = sorted({t.source_type for t in tensors})
    description = _description(d, raw_cfg, files, dtypes)
    return Source(
        arch=ARCH3N,
        config=config,
        tensors=tensors,
        tokenizer_kind=tok_kind,
        tokenizer_data=tok_data,
        special_tokens=special,
        chat_template=_chat_template(d, tok_cfg),
        description=description,
        add_bos=bool(special.get("add_bos", True)),
        notes=notes,
        input_files=_input_files(d, files),
    )


# The files besides the weights that the importer reads (config, tokenizer, chat template).
_AUX_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


def _input_files(d: Path, weight_files: list[Path]) -> list[Path]:
    """Every file of the checkpoint that the importer reads: the conversion may write none of them."""
    return list(weight_files) + [d / n for n in _AUX_FILES if (d / n).is_file()]


def _description(d: Path, raw_cfg: dict, files, dtypes) -> dict:
    """Provenance recorded in the bundle's `source` field."""
    return {
        "format": "hf",
        "path": str(d),
        "name": d.resolve().name,
        "model_type": raw_cfg.get("model_type"),
        "architectures": raw_cfg.get("architectures"),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "files": [f.name for f in files],
        "transformers_version": raw_cfg.get("transformers_version"),
    }
