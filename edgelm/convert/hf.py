"""Import a Hugging Face checkpoint directory (Gemma 3 or Gemma 3n) as a conversion `Source`.

A checkpoint directory holds config.json, one or more *.safetensors files (optionally with
model.safetensors.index.json) and the tokenizer files. The config is mapped by
edgelm.convert.hf_config; the tensors are read by one loop driven by the model file's tensor
table (edgelm/models/<arch>.py: every tensor's Hugging Face name, shape and kind, the
multimodal prefixes a text import skips, and `from_hf`, the conversion-time transform such as
Gemma 3's 1 + w norm folding). The text decoder's names sit under one of `model.`,
`language_model.model.` (what transformers writes to disk for the multimodal models),
`model.language_model.` (its in-memory naming since 4.52) or `language_model.`. Gemma 3's
vision tower is skipped with a note; Gemma 3n's image and audio towers (and their embedders)
are table rows too, kept unless `keep` leaves them out, with the preprocessor settings of
preprocessor_config.json. The source directory is only ever read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import FormatError
from ..models import gemma3
from .common import Source, SourceTensor
from .hf_checkpoint import ST_DTYPES, STEntry, read_entries, read_json, read_safetensors_header, same_tensor
from .hf_config import config_reader, gemma3n_config_from_hf, text_config_from_hf

__all__ = ["canonical_name", "gemma3n_config_from_hf", "load_hf_source", "read_safetensors_header",
           "text_config_from_hf"]

# Prefixes in front of the text decoder's own names (embed_tokens, layers.N..., norm).
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


def _decoder_name(hf_name: str) -> str:
    """An HF tensor name without the text decoder's prefix."""
    for p in _TEXT_PREFIXES:
        if hf_name.startswith(p):
            return hf_name[len(p):]
    return hf_name


def canonical_name(hf_name: str, model=gemma3) -> tuple[str, str | None]:
    """Classify an HF tensor name of `model` (a models/ module): ("text", canonical) /
    ("lm_head", None) / ("vision", None) (a multimodal tensor a text import skips) /
    ("unknown", None). Stacked tensors (Gemma 3n's AltUp projections) are "unknown" here."""
    if hf_name in _LM_HEAD:
        return "lm_head", None
    if hf_name.startswith(model.HF_SKIP_PREFIXES):
        return "vision", None
    rest = _decoder_name(hf_name)
    for row in model.GLOBAL_TENSORS + model.FINAL_TENSORS:
        if row.hf == rest:
            return "text", row.name
    m = _LAYER_RE.match(rest)
    if m:
        for row in model.LAYER_TENSORS:
            if row.hf == m.group(2):
                return "text", f"blk.{int(m.group(1))}.{row.name}"
    return "unknown", None


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
        t = read_json(cj, "chat template").get("chat_template")
        if isinstance(t, str):
            return t
    return None


def _loader(model, cfg, name: str, kind: str, parts: list[STEntry]) -> Callable[[], np.ndarray]:
    """Read one tensor (or the parts stacked by rows into it) and apply the model's transform
    (`import_hf(cfg, name, kind, w)` where the model has one, else `from_hf(kind, w)`)."""
    named = getattr(model, "import_hf", None)

    def transform(w):
        return named(cfg, name, kind, w) if named is not None else model.from_hf(kind, w)

    if len(parts) == 1:
        e = parts[0]

        def load() -> np.ndarray:
            return transform(e.read())
    else:
        def load() -> np.ndarray:
            return transform(np.concatenate([p.read() for p in parts], axis=0))
    return load


MODALITIES = ("vision", "audio")


def load_hf_source(path: str | os.PathLike, keep: tuple[str, ...] = MODALITIES) -> Source:
    """Read a Hugging Face Gemma 3 or Gemma 3n checkpoint directory (never modified).
    keep: the input modalities whose towers a Gemma 3n import keeps where the checkpoint has
    them (the others are skipped with a note, as a text-only import skips both)."""
    d = Path(path)
    if not d.exists():
        raise FormatError(f"{d}: no such directory")
    if not d.is_dir():
        raise FormatError(f"{d}: not a directory; pass the Hugging Face checkpoint directory")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no config.json — not a Hugging Face checkpoint directory")
    raw_cfg = read_json(cfg_path, "config")
    model, read_config = config_reader(raw_cfg.get("model_type"))
    bad_keep = [k for k in keep if k not in MODALITIES]
    if bad_keep:
        raise FormatError(f"unknown modality {bad_keep[0]!r} (expected {' or '.join(MODALITIES)})")
    if model is gemma3:
        config, _, notes = read_config(raw_cfg, str(cfg_path))
    else:
        config, _, notes = read_config(raw_cfg, str(cfg_path), keep=tuple(keep))
        dropped = [k for k in MODALITIES if k not in keep and isinstance(raw_cfg.get(f"{k}_config"), dict)]
        if dropped:
            notes.append(f"dropped the {' and '.join(dropped)} tower{'s' if len(dropped) > 1 else ''} on request "
                         f"(text{''.join(' + ' + k for k in MODALITIES if config.get(k))} bundle)")
    _add_preprocessing(d, config)
    cfg = model.Config.from_dict(config)
    files, _, entries = read_entries(d)

    table = model.tensor_table(cfg)
    slot = {hf: (canon, j) for canon, t in table.items() for j, hf in enumerate(t.hf)}
    unused = model.hf_unused(cfg) if hasattr(model, "hf_unused") else {}
    found: dict[str, dict[int, STEntry]] = {canon: {} for canon in table}
    relaid = model.relaid(cfg) if hasattr(model, "relaid") else set()
    lm_head: STEntry | None = None
    skipped = 0
    ignored: dict[str, int] = {}  # note -> how many tensors it counts
    for name, e in entries.items():
        if name in _LM_HEAD:
            lm_head = e
            continue
        rest = _decoder_name(name)
        if rest not in slot and name.startswith(model.HF_SKIP_PREFIXES):
            skipped += 1
            continue
        if rest in unused:
            ignored[unused[rest]] = ignored.get(unused[rest], 0) + 1
            continue
        if rest not in slot:
            raise FormatError(f"{e.file}: unexpected tensor {name} (not part of a {model.TITLE} text decoder with "
                              f"{cfg.num_layers} layers)")
        canon, j = slot[rest]
        if j in found[canon]:
            raise FormatError(f"{d}: tensors {found[canon][j].name} and {name} both map to {canon}")
        if e.dtype not in ST_DTYPES:
            raise FormatError(f"{e.file}: tensor {name} has dtype {e.dtype}; edgelm imports F32, F16 and BF16 checkpoints")
        t = table[canon]
        shape = (t.shape[0] // len(t.hf),) + t.shape[1:]  # one of the parts stacked by rows
        if canon in relaid and tuple(e.shape) != shape and int(np.prod(e.shape)) == int(np.prod(shape)):
            pass  # stored in another layout (a convolution as a GEMM matrix): import_hf reshapes it
        elif tuple(e.shape) != shape:
            raise FormatError(f"{e.file}: tensor {name} has shape {list(e.shape)}, config.json implies {list(shape)}")
        found[canon][j] = e
    missing = [(canon, hf) for canon, t in table.items() for j, hf in enumerate(t.hf) if j not in found[canon]]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(f"{d}: missing tensor {missing[0][0]} ({missing[0][1]}){more} for a "
                          f"{cfg.num_layers}-layer {model.TITLE}")
    if skipped:
        notes.append(f"skipped {skipped} {model.HF_SKIPPED}")
    notes.extend(note.format(n=n) for note, n in ignored.items())
    if lm_head is not None:
        emb = next(found[canon][0] for canon, t in table.items() if t.kind == "embed")
        if not (lm_head.dtype in ST_DTYPES and same_tensor(lm_head, emb)):  # else a saved copy of the tied embedding
            notes.append(f"{lm_head.name} differs from the embedding and was ignored: {model.TITLE} ties the output "
                         "head to token_embd")

    tensors = []
    for canon, t in table.items():
        parts = [found[canon][j] for j in range(len(t.hf))]
        tensors.append(SourceTensor(canon, t.shape, t.kind, _loader(model, cfg, canon, t.kind, parts),
                                    source_type=parts[0].dtype))

    from ..tokenizer.build import tokenizer_from_hf_dir  # imported late: optional at import time

    tok_kind, tok_data, special = tokenizer_from_hf_dir(d)
    tok_cfg_path = d / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, "tokenizer config") if tok_cfg_path.is_file() else None
    dtypes = sorted({t.source_type for t in tensors})
    description = _description(d, raw_cfg, files, dtypes)
    return Source(
        arch=model.ARCH,
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


def _add_preprocessing(d: Path, config: dict) -> None:
    """Each kept modality's preprocessor settings from preprocessor_config.json (transformers'
    defaults where the file is absent), checked by the front end that reads them."""
    kinds = [k for k in MODALITIES if isinstance(config.get(k), dict)]
    if not kinds:
        return
    from ..errors import BadInputError
    from ..multimodal import AudioFeatureConfig, ImageConfig

    path = d / "preprocessor_config.json"
    pre = read_json(path, "preprocessor config") if path.is_file() else {}
    fields = {"vision": ImageConfig, "audio": AudioFeatureConfig}
    for k in kinds:
        cls = fields[k]
        names = {f for f in cls.__dataclass_fields__} | ({"size", "do_center_crop", "do_pad"} if k == "vision" else set())
        sub = {key: v for key, v in pre.items() if key in names}
        try:
            cls.from_dict(sub)
        except BadInputError as e:
            raise FormatError(f"{path}: {e}") from None
        config[k]["preprocess"] = sub


# The files besides the weights that the importer reads (config, tokenizer, chat template).
_AUX_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


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
