"""Models are found by convention: architecture "x" lives in edgelm/models/x.py and exports
ARCH, Config (a frozen dataclass with from_dict, checking its own fields), its tensor table
(GLOBAL_TENSORS, LAYER_TENSORS, FINAL_TENSORS rows, dims, tensor_table, tensor_shapes), its
layer pattern (GLOBAL_EVERY), the importers' hooks (TITLE, from_hf, GGUF_NAMES,
HF_SKIP_PREFIXES, HF_SKIPPED, optionally hf_unused), load_weights, cache_specs and forward. Every other module in this
package is a shared helper (a name starting with "_")."""

from __future__ import annotations

import importlib
import re

from ..errors import FormatError
from ._config import check_tensor_shapes


def get_model(arch: str):
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", arch):
        raise FormatError(f"invalid architecture name {arch!r}")
    try:
        return importlib.import_module(f"{__name__}.{arch}")
    except ModuleNotFoundError:
        raise FormatError(f"architecture {arch!r} is not supported by this edgelm") from None


SPECIAL_IDS = ("bos", "eos", "unk", "pad", "start_of_turn", "end_of_turn")


def load_config(model, bundle):
    """The model config of `bundle`, checked against itself, the tensor table and the metadata
    the engine reads (tokenizer, special tokens, sampler): any inconsistency is a FormatError
    naming the bundle and the field."""
    try:
        cfg = model.Config.from_dict(bundle.config)
    except FormatError as e:
        raise FormatError(f"{bundle.path}: {e}") from None
    check_tensor_shapes(model.tensor_shapes(cfg), bundle)  # every tensor present, with the config's shape
    check_meta(bundle, cfg.vocab_size)
    return cfg


def check_meta(bundle, vocab_size: int) -> None:
    """What the engine reads from the header besides the config: a tokenizer, special token
    ids inside the vocabulary, and a valid default sampler."""
    from ..errors import BadInputError
    from ..runtime.sampler import SamplerConfig

    h = bundle.header
    where = bundle.path

    def fail(msg: str):
        raise FormatError(f"{where}: {msg}")

    if "tokenizer" not in h:
        fail("header field 'tokenizer' is missing")

    def check_id(name: str, v) -> None:
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"special token {name!r} must be a token id, got {v!r:.80}")
        if not 0 <= v < vocab_size:
            fail(f"special token {name!r} is {v}, outside the vocabulary (0..{vocab_size - 1})")

    special = h.get("special_tokens", {})
    for name in SPECIAL_IDS:
        if special.get(name) is not None:
            check_id(name, special[name])
    if "stop" in special:
        stop = special["stop"]
        if not isinstance(stop, list):
            fail(f"special token list 'stop' must be a list of token ids, got {stop!r:.80}")
        for v in stop:
            check_id("stop", v)
    if "add_bos" in special and not isinstance(special["add_bos"], bool):
        fail(f"special token field 'add_bos' must be true or false, got {special['add_bos']!r:.80}")
    sampler = h.get("sampler") or {}
    try:
        SamplerConfig.coerce({k: v for k, v in sampler.items() if k in ("temperature", "top_k", "top_p")})
    except BadInputError as e:
        fail(f"header field 'sampler': {e}")
