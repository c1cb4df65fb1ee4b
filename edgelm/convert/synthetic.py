"""Random weights of real Gemma geometries, for benchmarks and memory measurements.

`synthetic_source(name)` returns a conversion `Source` (see edgelm.convert.common) whose
tensors are seeded random numbers of the real shapes of gemma3-270m, gemma3-1b,
gemma3-4b, gemma3n-e2b or gemma3n-e4b (vocabularies included: the head and embedding
tables have the real 262k rows), plus a tiny synthetic SentencePiece tokenizer (specials,
256 byte pieces, letters), so `convert()` can write a bundle that edgelm runs.

Nothing is generated until the converter asks for a tensor, and each tensor is made on its
own, so writing even E4B (2.35 B embedding weights, PLE included) holds one tensor at a
time. Every 2-D (or 3-D) tensor carries an any-scheme passthrough ("*", see SourceTensor): the
converter hands it the planned scheme and it makes the quantized parts directly (random
int8/int4 codes with a matching scale, or normal floats for fp16/fp32, in row chunks),
which is fast and never materializes a float32 copy of a quantized tensor. `load()` (plain
float32) remains for callers that want arrays.
The outputs are meaningless: the point is the real geometry, speed and memory.

Gemma 3n's image and audio towers: `synthetic_source("gemma3n-e2b", towers=True)` (and E4B)
adds both, with the published geometry (the MobileNet-V5 300M encoder and the USM
conformer of google/gemma-3n-E*B, the real prompt ids, 256 image and 188 audio soft tokens),
so a bundle of it answers Image / Audio parts. Towers are off by default: the text-only
source, its config and every bundle cached from it stay what they were (derived test
geometries shrink the vocabulary below the media token ids). `edgelm bench --synthetic`
asks for them (`--tower-scheme`).
"""

from __future__ import annotations

import zlib

import numpy as np

from ..errors import BadInputError
from ..models import gemma3, gemma3n, get_model
from ..models._config import layer_pattern

NAMES = ("gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3n-e2b", "gemma3n-e4b")


def _gemma3(layers, hidden, inter, heads, kv, vocab, window, max_pos, rope_factor=1.0) -> dict:
    return {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_layers": layers,
        "num_heads": heads, "num_kv_heads": kv, "head_dim": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "rope_local_theta": 10_000.0, "rope_scaling_factor": rope_factor,
        "sliding_window": window,
        "layer_types": list(layer_pattern(layers, gemma3.GLOBAL_EVERY)),
        "query_pre_attn_scalar": 256.0, "final_logit_softcap": None, "attn_logit_softcap": None,
        "max_position_embeddings": max_pos,
    }


def _gemma3n(layers, inter, shared) -> dict:
    return {
        "vocab_size": 262_400, "hidden_size": 2048, "intermediate_size": [inter] * layers, "num_layers": layers,
        "num_heads": 8, "num_kv_heads": 2, "head_dim": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "rope_local_theta": 10_000.0, "rope_scaling_factor": 1.0,
        "sliding_window": 512,
        "layer_types": list(layer_pattern(layers, gemma3n.GLOBAL_EVERY)),
        "final_logit_softcap": 30.0, "max_position_embeddings": 32_768,
        "vocab_size_per_layer_input": 262_144, "hidden_size_per_layer_input": 256,
        "altup_num_inputs": 4, "altup_active_idx": 0, "altup_correct_scale": True,
        "num_kv_shared_layers": shared, "laurel_rank": 64,
        "activation_sparsity": [0.95] * 10 + [0.0] * (layers - 10),
    }


# The published text configs (HF config.json / GGUF metadata of the google/ checkpoints).
GEOMETRIES: dict[str, tuple[str, dict]] = {
    "gemma3-270m": ("gemma3", _gemma3(18, 640, 2048, 4, 1, 262_144, 512, 32_768)),
    "gemma3-1b": ("gemma3", _gemma3(26, 1152, 6912, 4, 1, 262_144, 512, 32_768)),
    "gemma3-4b": ("gemma3", _gemma3(34, 2560, 10_240, 8, 4, 262_208, 1024, 131_072, rope_factor=8.0)),
    "gemma3n-e2b": ("gemma3n", _gemma3n(30, 8192, 10)),
    "gemma3n-e4b": ("gemma3n", _gemma3n(35, 16_384, 15)),
}


def _modality(kind: str, token_id: int, begin_id: int, end_id: int, vocab_offset: int, soft_tokens: int,
              hidden_size: int) -> dict:
    """A gemma3n Modality dict with the real ids and the tower's default (published) config;
    preprocess {}: the front ends' defaults (768 x 768 SigLIP-normalised images, 16 kHz
    128-bin log-mel audio)."""
    from ..models import _gemma3n_audio, _mobilenetv5

    tower = (_mobilenetv5.VisionConfig if kind == "vision" else _gemma3n_audio.AudioConfig).from_hf({})
    return {"kind": kind, "tower": tower.to_dict(), "token_id": token_id, "begin_id": begin_id, "end_id": end_id,
            "vocab_offset": vocab_offset, "vocab_size": 128, "soft_tokens": soft_tokens, "hidden_size": hidden_size,
            "eps": 1e-6, "preprocess": {}}


def _gemma3n_towers() -> dict:
    """Gemma 3n's vision and audio inputs as google/gemma-3n-E2B and E4B have them (the same
    in both; edgelm.convert.hf_config.GEMMA3N_MM_DEFAULTS)."""
    return {"vision": _modality("vision", 262_145, 255_999, 262_144, 262_144, 256, 2048),
            "audio": _modality("audio", 262_273, 256_000, 262_272, 262_272, 188, 1536)}


# Geometries whose real checkpoints have towers: name -> the config fields that add them.
TOWERS = {"gemma3n-e2b": _gemma3n_towers, "gemma3n-e4b": _gemma3n_towers}


def has_towers(name: str) -> bool:
    """Whether `towers=True` adds image/audio towers to this geometry."""
    return name in TOWERS


def synthetic_config(name: str, towers: bool = False) -> tuple[str, dict]:
    """(arch, config dict) of a named geometry; towers=True adds its image and audio towers
    (Gemma 3n; other geometries have none and stay text-only)."""
    if name not in GEOMETRIES:
        raise BadInputError(f"unknown synthetic model {name!r}; choose one of {', '.join(NAMES)}")
    arch, cfg = GEOMETRIES[name]
    cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    if towers and name in TOWERS:
        cfg.update(TOWERS[name]())
    return arch, cfg


# ----------------------------------------------------------------------------- tokenizer

_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_WORDS = ["\u2581the", "\u2581a", "\u2581is", "\u2581of", "\u2581and", "\u2581to", "\u2581in", "\u2581model", "\u2581user",
          "th", "he", "in", "er", "an", "on", "\u2581t", "\u2581a"]


def synthetic_tokenizer() -> tuple[str, bytes, dict]:
    """(kind, blob, special tokens) of a tiny SentencePiece BPE model with byte fallback:
    Gemma's special ids 0..3, the turn markers, the 256 byte pieces, letters and a few words."""
    from ..tokenizer.build import KIND_SENTENCEPIECE, _build_spm_model

    pieces = list(_SPECIALS)
    types = [3, 3, 3, 2, 3, 3]  # control, unknown
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    chars = ["\u2581"] + [chr(c) for c in range(33, 127)]
    for p in chars + _WORDS:
        if p not in pieces:
            pieces.append(p)
            types.append(1)
    scores = [0.0] * len(pieces)
    first_normal = 6 + 256
    for i in range(first_normal, len(pieces)):
        scores[i] = -float(i)
    data = _build_spm_model(pieces, scores, types, unk=3, bos=2, eos=1, pad=0, add_dummy_prefix=False)
    special = {"bos": 2, "eos": 1, "unk": 3, "pad": 0, "start_of_turn": 4, "end_of_turn": 5, "stop": [1, 5],
               "add_bos": True}
    return KIND_SENTENCEPIECE, data, special


# ----------------------------------------------------------------------------- tensors

def _tensor_shapes(arch: str, cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    model = get_model(arch)
    return model.tensor_shapes(model.Config.from_dict(cfg))


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _std(name: str, kind: str, shape) -> float:
    if kind in ("embed", "ple"):
        return 0.03
    if "altup_predict" in name or "altup_correct_coef" in name or "altup_router" in name:
        return 0.05
    # 1 / sqrt(fan-in): the columns of a matrix, the k x k taps of a depthwise kernel [C, k, k]
    return float(np.prod(shape[1:])) ** -0.5 if len(shape) > 1 else 0.02


def _vector_center(name: str, shape) -> float:
    """The value a 1-D tensor scatters around. Norm weights and scales hold their final
    multiplier: 1. Towers: a bias is 0; the audio query scale is stored as the whole
    multiplier head_dim^-0.5 * softplus(p) / softplus(0), which is head_dim^-0.5 at p = 0
    (a scale of 1 would make every attention logit hit the soft-cap)."""
    if name.endswith(".bias"):
        return 0.0
    if name.endswith(".attn.q_scale"):
        return float(shape[0]) ** -0.5
    return 1.0


def _float_loader(name: str, shape, kind: str, seed: int):
    def load() -> np.ndarray:
        rng = _rng(seed, name)
        if len(shape) == 1:
            c = _vector_center(name, shape)
            return (c + 0.02 * (abs(c) or 1.0) * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(_std(name, kind, shape))
    return load


_CHUNK = 1 << 14  # rows generated at a time (bounds the temporaries of big tables)


def _parts_loader(name: str, shape, kind: str, seed: int):
    """load(scheme): parts of `scheme` made directly: random codes, scales giving the target std."""
    rows, cols = int(shape[0]), int(np.prod(shape[1:]))
    std = _std(name, kind, shape)

    def load(scheme) -> dict[str, np.ndarray]:
        rng = _rng(seed, name)
        out = {}
        for pname, (dt, pshape) in scheme.part_specs(rows, cols).items():
            dt = np.dtype(dt)
            arr = np.empty(pshape, dtype=dt)
            if pname == "scale":
                code_std = 73.6 if scheme.weight_bits == 8 else 4.61  # std of uniform int8 / int4 codes
                arr[...] = std / code_std
            elif dt == np.uint8:  # packed int4 nibbles
                for lo in range(0, pshape[0], _CHUNK):
                    arr[lo:lo + _CHUNK] = rng.integers(0, 256, size=arr[lo:lo + _CHUNK].shape, dtype=np.uint8)
            elif dt == np.int8:
                for lo in range(0, pshape[0], _CHUNK):
                    arr[lo:lo + _CHUNK] = rng.integers(-127, 128, size=arr[lo:lo + _CHUNK].shape, dtype=np.int8)
            else:  # fp16 / fp32 weights
                for lo in range(0, pshape[0], _CHUNK):
                    blk = arr[lo:lo + _CHUNK]
                    blk[...] = rng.standard_normal(blk.shape, dtype=np.float32) * np.float32(std)
            out[pname] = arr
        return out
    return load


def synthetic_source(name: str, seed: int = 0, towers: bool = False, **_ignored):
    """A conversion Source of random weights with the real geometry of `name` (convert it
    with any schemes: 2-D and 3-D tensors are generated directly in the planned scheme).
    towers=True: Gemma 3n's image and audio towers and their embedders too (kind "tower"
    for their products: convert(..., tower_scheme=) picks their scheme)."""
    from .common import Source, SourceTensor

    arch, cfg = synthetic_config(name, towers=towers)
    tensors = []
    for tname, (shape, kind) in _tensor_shapes(arch, cfg).items():
        st = SourceTensor(tname, tuple(shape), kind, _float_loader(tname, tuple(shape), kind, seed))
        if len(shape) > 1:
            st.passthrough = ("*", _parts_loader(tname, tuple(shape), kind, seed))
        tensors.append(st)
    kind_, blob, special = synthetic_tokenizer()
    return Source(
        arch=arch,
        config=cfg,
        tensors=tensors,
        tokenizer_kind=kind_,
        tokenizer_data=blob,
        special_tokens=special,
        chat_template=None,
        description={"format": "synthetic", "name": name, "seed": seed,
                     "note": "random weights of the real geometry; outputs are meaningless",
                     **({"towers": ["vision", "audio"]} if towers and name in TOWERS else {})},
        add_bos=True,
        notes=[f"synthetic {name}: random weights (seed {seed}) of the real geometry"
               + (" with its image and audio towers" if towers and name in TOWERS else "")
               + ", tiny synthetic tokenizer"],
    )
