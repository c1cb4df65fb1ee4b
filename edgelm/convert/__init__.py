"""Importers (GGUF, Hugging Face) and the conversion pipeline."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError
from .common import LINEAR_SCHEMES, Source, convert


def load_source(path: str | os.PathLike, keep: tuple[str, ...] = ("vision", "audio")) -> Source:
    """A GGUF file or a Hugging Face checkpoint directory. keep: the input modalities whose
    towers a Gemma 3n checkpoint import keeps (GGUF files hold text decoders only)."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or directory")
    if p.is_dir():
        from .hf import load_hf_source

        return load_hf_source(p, keep=tuple(keep))
    from .gguf_import import load_gguf_source

    return load_gguf_source(p)


__all__ = ["LINEAR_SCHEMES", "Source", "convert", "load_source"]
