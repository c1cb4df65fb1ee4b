"""Gemma 3n text decoder (E2B, E4B and MatFormer slices of them).

Numerics follow transformers' `Gemma3nTextModel` / `Gemma3nForCausalLM` (modeling_gemma3n.py):

* Embeddings: token_embd rows * sqrt(hidden) (the fp32 constant); per-layer embeddings
  (PLE) rows * sqrt(hidden_per_layer). Ids at or past `vocab_size_per_layer_input` take PLE
  row 0, as transformers does.
* Per-layer inputs: rmsnorm(per_layer_model_proj(x0) * hidden**-0.5) + PLE, times 1/sqrt(2),
  one [hidden_per_layer] slice per layer.
* AltUp: 4 streams. Stream 0 is the scaled embedding, streams 1..3 are altup_proj(x0)
  rescaled to stream 0's RMS. Each layer predicts (a router-conditioned 4x4 mix of the
  streams), runs the transformer block on the active stream, then corrects every stream
  with the innovation; the per-layer input gate/projection is added to streams 1..3.
  At the end streams 1..3 go through altup_unembd_proj, are rescaled to stream 0's RMS,
  and the 4 streams are averaged.
* LAuReL: normed + rmsnorm(laurel_r(laurel_l(normed))), averaged with the attention
  residual ((x + attn + laurel) / sqrt 2).
* Attention: GQA with q/k RMSNorm, a scale-free RMSNorm on v ("v-norm"), RoPE (10k local,
  1M global by default), attention scaling 1.0, 4 local : 1 global (from layer_types).
* KV sharing: the last `num_kv_shared_layers` layers have no K/V weights and no cache;
  each reads the K/V of the last earlier non-shared layer of its own type (sliding/full),
  exactly as transformers' `kv_sharing_modes` ("store"/"reuse") does. Because those layers
  write no state, a chunk whose logits are not wanted skips them, and a chunk that wants
  only the last token's logits runs them on that token alone.
* FFN: GeGLU (tanh GELU) with a per-layer width; on layers with activation sparsity s > 0
  the gate is replaced by relu(gate - (mean + std * Phi^-1(s))) (Gaussian top-k), with
  Phi^-1 from statistics.NormalDist.
* Gemma 3n's RMSNorm multiplies by w directly (no 1 + w), so norms are stored as-is.
* Output: rmsnorm, the tied head (token_embd), final logit soft-cap.

Canonical tensor names are llama.cpp's gemma3n names where it has them; the tensor table
below lists every tensor with its shape, kind and Hugging Face name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist

from ..errors import FormatError
from . import gemma3
from ._config import (GLOBAL, INT_MAX, LOCAL, MAX_LAYERS, Tensor, TensorRow, bad, build_table, check_bool, check_float,
                      check_head_dim, check_heads, check_int, check_layer_types, config_from_dict,
                      is_int, layer_pattern, shapes_of)
from ._inputs import splice

ARCH = "gemma3n"
TITLE = "Gemma 3n"
GLOBAL_EVERY = 5  # every 5th layer is global, the rest sliding-window (4:1)


VISION, AUDIO = "vision", "audio"
_TOWER_PREFIX = {VISION: "v.", AUDIO: "a."}  # canonical name prefixes of each tower's tensors
_EMBEDDER_PREFIX = {VISION: "mm.v.", AUDIO: "mm.a."}
_HF_TOWER = {VISION: "vision_tower.", AUDIO: "audio_tower."}  # HF names, after the "model." prefix
_HF_EMBEDDER = {VISION: "embed_vision.", AUDIO: "embed_audio."}


def _tower_module(kind: str):
    from . import _gemma3n_audio, _mobilenetv5

    return _mobilenetv5 if kind == VISION else _gemma3n_audio


@dataclass(frozen=True, kw_only=True)
class Modality:
    """How one input modality (vision or audio) joins the text decoder: its tower's config,
    its embedder (Gemma3nMultimodalEmbedder) and its prompt tokens. In a prompt an item is
    `begin_id`, `soft_tokens` x `token_id` (rows the tower's features replace), `end_id`.
    Ids in [vocab_offset, vocab_offset + vocab_size) are the modality's hard tokens: their
    embedding comes from the embedder's own table, not token_embd."""

    kind: str  # "vision" | "audio"
    tower: object  # _mobilenetv5.VisionConfig | _gemma3n_audio.AudioConfig (a dict in bundle metadata)
    token_id: int
    begin_id: int
    end_id: int
    vocab_offset: int
    vocab_size: int = 128
    soft_tokens: int  # placeholders per item: 256 per image, 188 per audio clip (30 s)
    hidden_size: int  # the tower's output width (the embedder's input)
    eps: float = 1e-6  # the embedder's RMSNorm eps
    # the checkpoint's preprocessor_config.json fields for this input (image size, mean and
    # std; mel settings): read by edgelm.multimodal's front ends, which check them
    preprocess: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in (VISION, AUDIO):
            raise bad("kind", "must be 'vision' or 'audio'", self.kind)
        for f in ("token_id", "begin_id", "end_id", "vocab_offset"):
            check_int(self, f, lo=0)
        for f in ("vocab_size", "soft_tokens", "hidden_size"):
            check_int(self, f)
        check_float(self, "eps")
        if not isinstance(self.preprocess, dict):
            raise bad("preprocess", "must be an object", self.preprocess)
        mod = _tower_module(self.kind)
        cls = mod.VisionConfig if self.kind == VISION else mod.AudioConfig
        if isinstance(self.tower, dict):
            object.__setattr__(self, "tower", cls.from_dict(self.tower))
        elif not isinstance(self.tower, cls):
            raise bad("tower", "must be an object", self.tower)

    @classmethod
    def from_dict(cls, kind: str, d) -> "Modality":
        if not isinstance(d, dict):
            raise bad(kind, "must be an object or null", d)
        if d.get("kind", kind) != kind:
            raise bad(f"{kind}.kind", f"must be {kind!r}", d.get("kind"))
        try:
            return config_from_dict(cls, {**d, "kind": kind}, f"gemma3n {kind}")
        except FormatError as e:
            raise FormatError(f"{kind}: {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tower"] = self.tower.to_dict()
        return d


@dataclass(frozen=True, kw_only=True)
class Gemma3nConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: tuple[int, ...]  # one FFN width per layer (an int means all layers)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    rope_scaling_factor: float = 1.0  # linear scaling, global layers only
    sliding_window: int = 512
    layer_types: tuple[str, ...] = ()
    final_logit_softcap: float | None = 30.0
    max_position_embeddings: int = 32768
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    num_kv_shared_layers: int = 0
    laurel_rank: int = 64
    activation_sparsity: tuple[float, ...] = ()  # one target per layer; 0 = dense
    vision: Modality | None = None  # image input (MobileNet-V5 tower), if the bundle keeps it
    audio: Modality | None = None  # audio input (USM conformer tower), if the bundle keeps it

    def __post_init__(self):
        n = check_int(self, "num_layers", hi=MAX_LAYERS)
        for f in ("vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size_per_layer_input",
                  "hidden_size_per_layer_input", "laurel_rank", "max_position_embeddings"):
            check_int(self, f)
        check_int(self, "altup_num_inputs", lo=2)  # the active stream and at least one predicted one
        check_int(self, "altup_active_idx", lo=0, hi=self.altup_num_inputs - 1)
        check_heads(self)
        check_head_dim(self)
        inter = self.intermediate_size
        if is_int(inter):
            inter = (inter,) * n
        if not isinstance(inter, (list, tuple)):
            raise bad("intermediate_size", "must be an integer or a list of one per layer", inter)
        if len(inter) != n:
            raise FormatError(f"config field 'intermediate_size' has {len(inter)} entries for {n} layers")
        if not all(is_int(v) and 1 <= v <= INT_MAX for v in inter):
            raise bad("intermediate_size", "must list positive integers", list(inter))
        object.__setattr__(self, "intermediate_size", tuple(inter))
        for f in ("rms_norm_eps", "rope_theta", "rope_local_theta", "rope_scaling_factor"):
            check_float(self, f)
        check_float(self, "final_logit_softcap", optional=True, zero_ok=True)  # null or 0: no soft-cap
        check_bool(self, "altup_correct_scale")
        check_layer_types(self, (LOCAL, GLOBAL), lambda n: layer_pattern(n, GLOBAL_EVERY))
        check_int(self, "sliding_window", lo=1 if LOCAL in self.layer_types else 0)
        sp = self.activation_sparsity
        if not isinstance(sp, (list, tuple)):
            raise bad("activation_sparsity", "must be a list of one target per layer", sp)
        sp = sp or (0.0,) * n
        if len(sp) != n:
            raise FormatError(f"config field 'activation_sparsity' has {len(sp)} entries for {n} layers")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s < 1.0 for s in sp):
            raise bad("activation_sparsity", "must list targets in [0, 1)", list(sp))
        object.__setattr__(self, "activation_sparsity", tuple(float(s) for s in sp))
        check_int(self, "num_kv_shared_layers", lo=0, hi=n - 1)
        k = self.num_kv_shared_layers
        if k and set(self.layer_types[: n - k]) != set(self.layer_types):
            # transformers' kv_sharing_modes raises the same way
            raise FormatError(f"config field 'num_kv_shared_layers' is invalid, got {k}: the layer types producing a "
                              f"KV cache (the first {n - k} layers) do not cover every layer type")
        for kind in (VISION, AUDIO):
            m = getattr(self, kind)
            if m is None:
                continue
            if not isinstance(m, Modality):
                m = Modality.from_dict(kind, m)
                object.__setattr__(self, kind, m)
            for f in ("token_id", "begin_id", "end_id"):
                if getattr(m, f) >= self.vocab_size:
                    raise bad(f"{kind}.{f}", f"must be a token id below vocab_size {self.vocab_size}", getattr(m, f))
            if kind == AUDIO and not m.vocab_offset <= self.vocab_size - 1 < m.vocab_offset + m.vocab_size:
                # transformers pads audio with the embedding of the last id, an audio hard token
                raise FormatError(f"config field 'audio.vocab_offset' is invalid, got {m.vocab_offset}: the last "
                                  f"token id {self.vocab_size - 1} (audio padding) must be an audio token")
            if m.vocab_offset + m.vocab_size > self.vocab_size:
                raise FormatError(f"config field '{kind}.vocab_offset' is invalid, got {m.vocab_offset}: the {kind} "
                                  f"token range [{m.vocab_offset}, {m.vocab_offset + m.vocab_size}) passes vocab_size "
                                  f"{self.vocab_size}")

    # ------------------------------------------------------------------ derived

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_layers - self.num_kv_shared_layers

    def kv_source(self) -> tuple[int, ...]:
        """For each layer, the layer whose K/V it attends over (itself unless KV-shared):
        the last layer of the same type before the shared range (transformers' "store")."""
        first = self.first_kv_shared_layer
        if not self.num_kv_shared_layers:
            return tuple(range(self.num_layers))
        producer = {t: max(i for i in range(first) if self.layer_types[i] == t) for t in set(self.layer_types)}
        return tuple(i if i < first else producer[self.layer_types[i]] for i in range(self.num_layers))

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3nConfig":
        return config_from_dict(cls, d, ARCH)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("layer_types", "intermediate_size", "activation_sparsity"):
            d[k] = list(getattr(self, k))
        for kind in (VISION, AUDIO):
            m = getattr(self, kind)
            d[kind] = None if m is None else m.to_dict()
        return d

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(m for m in (self.vision, self.audio) if m is not None)


Config = Gemma3nConfig


# ----------------------------------------------------------------------------- weights

# Every tensor of the model, one row each: Weights/Layer field, canonical name (per-layer:
# after "blk.N."), Hugging Face name (per-layer: after "layers.N."), kind, shape. Dimensions:
# L layers, P = hidden_size_per_layer_input, A = altup_num_inputs, r = laurel_rank, inter =
# the layer's FFN width.
GLOBAL_TENSORS = (
    TensorRow("embed", "token_embd.weight", "embed_tokens.weight", "embed", ("vocab", "h")),  # also the head
    # per-layer embeddings: kind "ple", its own scheme; only ever row-gathered
    TensorRow("ple", "per_layer_token_embd.weight", "embed_tokens_per_layer.weight", "ple", ("vocab_ple", "L*P")),
    TensorRow("ple_proj", "per_layer_model_proj.weight", "per_layer_model_projection.weight", "linear",
              ("L*P", "h")),
    TensorRow("ple_proj_norm", "per_layer_proj_norm.weight", "per_layer_projection_norm.weight", "norm", ("P",)),
    # the A-1 AltUp projections, stacked by rows
    TensorRow("altup_proj", "altup_proj.weight", "altup_projections.{j}.weight", "linear", ("(A-1)*h", "h")),
    TensorRow("altup_unembd", "altup_unembd_proj.weight", "altup_unembed_projections.{j}.weight", "linear",
              ("(A-1)*h", "h")),
)
# a Gemma 3 block's tensors (k, v and k_norm absent from KV-shared layers), then Gemma 3n's own
LAYER_TENSORS = gemma3.LAYER_TENSORS + (
    TensorRow("altup_predict", "altup_predict_coef.weight", "altup.prediction_coefs.weight", "other", ("A*A", "A")),
    TensorRow("altup_correct", "altup_correct_coef.weight", "altup.correction_coefs.weight", "other", ("A", "A")),
    TensorRow("altup_router", "altup_router.weight", "altup.modality_router.weight", "other", ("A", "h")),
    TensorRow("altup_router_norm", "altup_router_norm.weight", "altup.router_norm.weight", "norm", ("h",)),
    TensorRow("altup_correct_scale", "altup_correct_scale.weight", "altup.correct_output_scale", "norm", ("h",)),
    TensorRow("laurel_l", "laurel_l.weight", "laurel.linear_left.weight", "linear", ("r", "h")),
    TensorRow("laurel_r", "laurel_r.weight", "laurel.linear_right.weight", "linear", ("h", "r")),
    TensorRow("laurel_norm", "laurel_post_norm.weight", "laurel.post_laurel_norm.weight", "norm", ("h",)),
    TensorRow("inp_gate", "inp_gate.weight", "per_layer_input_gate.weight", "linear", ("P", "h")),
    TensorRow("proj", "proj.weight", "per_layer_projection.weight", "linear", ("h", "P")),
    TensorRow("post_norm", "post_norm.weight", "post_per_layer_input_norm.weight", "norm", ("h",)),  # post PLE
)
FINAL_TENSORS = (
    TensorRow("output_norm", "output_norm.weight", "norm.weight", "norm", ("h",)),
)
_KV_ONLY = {"k", "v", "k_norm"}  # fields absent from KV-shared layers
# GGUF name of a canonical name where they differ: none
GGUF_NAMES: dict[str, str] = {}
# Hugging Face tensors a text import skips: the vision and audio towers and their embedders
HF_SKIP_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.",
                    "vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")
HF_SKIPPED = "vision/audio tower and multimodal embedder tensors (of towers this bundle does not keep)"


def dims(cfg: Gemma3nConfig, layer: int | None) -> dict[str, int]:
    """The dimension names of the table's shapes ("parts": how many HF tensors a stacked one has)."""
    h, A, P = cfg.hidden_size, cfg.altup_num_inputs, cfg.hidden_size_per_layer_input
    d = {"vocab": cfg.vocab_size, "vocab_ple": cfg.vocab_size_per_layer_input, "h": h, "hd": cfg.head_dim,
         "q": cfg.num_heads * cfg.head_dim, "kv": cfg.num_kv_heads * cfg.head_dim, "P": P, "L*P": cfg.num_layers * P,
         "A": A, "A*A": A * A, "(A-1)*h": (A - 1) * h, "parts": A - 1, "r": cfg.laurel_rank}
    if layer is not None:
        d["inter"] = cfg.intermediate_size[layer]
    return d


def tensor_table(cfg: Gemma3nConfig) -> dict:
    """Canonical name -> Tensor (shape, kind, HF names, layer, field) for every tensor, in bundle
    order: the text decoder's, then each kept modality's embedder and tower."""
    first_shared = cfg.first_kv_shared_layer
    table = build_table(cfg, dims, GLOBAL_TENSORS, LAYER_TENSORS, FINAL_TENSORS,
                        present=lambda i, row: i < first_shared or row.field not in _KV_ONLY)
    for m in cfg.modalities:
        table.update(modality_table(cfg, m))
    return table


def modality_table(cfg: Gemma3nConfig, m: Modality) -> dict:
    """The tensors of one modality: its embedder (the hard-token table and its norm, the soft
    norm, the projection to the text width; the post-projection norm has no scale), then its
    tower's (kind "linear" there becomes "tower": products the tower scheme quantizes)."""
    e, hf = _EMBEDDER_PREFIX[m.kind], _HF_EMBEDDER[m.kind]
    rows = (("embd", (m.vocab_size, m.hidden_size), "other", "embedding.weight"),
            ("hard_norm", (m.hidden_size,), "norm", "hard_embedding_norm.weight"),
            ("soft_norm", (m.hidden_size,), "norm", "soft_embedding_norm.weight"),
            ("proj", (cfg.hidden_size, m.hidden_size), "tower", "embedding_projection.weight"))
    # (a modality's tensors are found by name: each one's field is its canonical name)
    out = {e + n: Tensor(shape, kind, (hf + h,), None, e + n) for n, shape, kind, h in rows}
    for name, t in _tower_module(m.kind).tensor_table(m.tower).items():
        kind = "tower" if t.kind == "linear" else t.kind
        out[name] = Tensor(tuple(t.shape), kind, (_HF_TOWER[m.kind] + t.hf,), None, name)
    return out


def tensor_shapes(cfg: Gemma3nConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind) for every tensor of the model, in bundle order.
    Kinds are SourceTensor kinds: embed, ple, linear, norm, other (fp32)."""
    return shapes_of(tensor_table(cfg))


def from_hf(kind: str, w):
    """A float32 tensor read from a Hugging Face checkpoint -> as stored: unchanged (Gemma 3n's
    RMSNorm multiplies by w itself)."""
    return w


def relaid(cfg: Gemma3nConfig) -> set[str]:
    """Tensors stored in another layout than the checkpoint's (same size): the towers'."""
    return {name for m in cfg.modalities for name in modality_table(cfg, m) if name.startswith(_TOWER_PREFIX[m.kind])}


def import_hf(cfg: Gemma3nConfig, name: str, kind: str, w):
    """As from_hf, for any tensor of the table: a tower's tensors take their tower's
    conversion-time layout (convolutions as GEMM matrices and so on)."""
    for m in cfg.modalities:
        if name.startswith(_TOWER_PREFIX[m.kind]):
            return _tower_module(m.kind).import_tensor(m.tower, name, w)
    return from_hf(kind, w)


def hf_unused(cfg: Gemma3nConfig) -> dict[str, str]:
    """Hugging Face tensors an import ignores, each with the note that counts them ({n}): real
    checkpoints keep K/V weights (and a v-norm entry) in KV-shared layers, which never use them."""
    note = "ignored {n} K/V tensors of KV-shared layers (they reuse earlier layers' caches)"
    return {f"layers.{i}.self_attn.{t}.weight": note for i in range(cfg.first_kv_shared_layer, cfg.num_layers)
            for t in ("k_proj", "v_proj", "k_norm", "v_norm")}


# One attribute per LAYER_TENSORS row: views into the bundle's mmap, norms as fp32 arrays;
# None where the table has no tensor (k, v, k_norm in KV-shared layers).
Layer = dataclasses.make_dataclass("Layer", [(r.field, object) for r in LAYER_TENSORS], frozen=True)


@dataclass(frozen=True)
class Weights:
    embed: object  # QTensor [vocab, hidden]; also the tied output head
    ple: object  # QTensor [vocab_per_layer, L*P]: a view into the mmap, only ever row-gathered
    ple_proj: object  # QTensor [L*P, hidden]
    ple_proj_norm: object  # float32 [P]
    altup_proj: object  # QTensor [(A-1)*hidden, hidden]
    altup_unembd: tuple  # A-1 QTensor row views [hidden, hidden]
    output_norm: object
    layers: tuple
    v_norm: object  # float32 ones [head_dim]: v-norm has no scale
    # kept modalities: kind -> {canonical name: tensor} for its embedder ("mm.v.*") and tower
    # ("v.*"); products ("tower" kind) as QTensors, everything else as fp32 array views
    media: dict = dataclasses.field(default_factory=dict)
    # Tensors a device backend may leave in the mmap: only row gathers read them, never a product.
    HOST_GATHERED = ("ple",)


def _row_view(t, lo: int, hi: int):
    """Rows [lo, hi) of a QTensor, as a view (every scheme stores its parts row-major)."""
    from ..quant.schemes import QTensor

    parts = {k: v[lo:hi] for k, v in t.parts.items()}
    return QTensor(t.scheme, (hi - lo,) + tuple(t.shape[1:]), parts)


def load_weights(cfg: Gemma3nConfig, bundle) -> Weights:
    """Views into the bundle's mmap: nothing is copied. Norms become plain fp32 arrays."""
    import numpy as np

    glob: dict = {}
    # a field the table has no tensor for (K/V in KV-shared layers) stays None
    layers = [dict.fromkeys(f.name for f in dataclasses.fields(Layer)) for _ in range(cfg.num_layers)]
    media: dict[str, dict] = {m.kind: {} for m in cfg.modalities}
    owner = {p: m.kind for m in cfg.modalities for p in (_TOWER_PREFIX[m.kind], _EMBEDDER_PREFIX[m.kind])}
    for name, t in tensor_table(cfg).items():
        qt = bundle.tensor(name)
        kind = next((k for p, k in owner.items() if name.startswith(p)), None)
        if kind is not None:  # products and the hard-token table as QTensors, the rest as fp32 arrays
            keep = t.kind == "tower" or name == _EMBEDDER_PREFIX[kind] + "embd"
            media[kind][name] = qt if keep else qt.parts["w"].reshape(qt.shape)
            continue
        (glob if t.layer is None else layers[t.layer])[t.field] = qt.parts["w"] if t.kind == "norm" else qt
    h, A = cfg.hidden_size, cfg.altup_num_inputs
    unembd = glob.pop("altup_unembd")
    return Weights(
        **glob,
        altup_unembd=tuple(_row_view(unembd, j * h, (j + 1) * h) for j in range(A - 1)),
        layers=tuple(Layer(**kw) for kw in layers),
        v_norm=np.ones(cfg.head_dim, dtype=np.float32),
        media=media,
    )


# ----------------------------------------------------------------------------- caches

def cache_specs(cfg: Gemma3nConfig, capacity: int, max_chunk: int) -> list:
    """One K/V cache per non-shared layer (layers 0 .. first_kv_shared_layer-1); KV-shared
    layers have none. Sliding layers keep a ring of window - 1 + max_chunk slots."""
    from ..backends.kvcache import CacheSpec, sliding_slots

    ring = CacheSpec(sliding_slots(capacity, cfg.sliding_window, max_chunk), cfg.num_kv_heads, cfg.head_dim,
                     int(cfg.sliding_window))
    full = CacheSpec(capacity, cfg.num_kv_heads, cfg.head_dim)
    return [ring if t == LOCAL else full for t in cfg.layer_types[: cfg.first_kv_shared_layer]]


# ----------------------------------------------------------------------------- forward

def sparsity_multiplier(s: float) -> float:
    """Phi^-1(s): the Gaussian top-k cutoff in standard deviations (transformers' icdf)."""
    return NormalDist().inv_cdf(s)


def _router(ops, x, L, eps, inv_h):
    return ops.tanh(ops.matmul(ops.rmsnorm(x, L.altup_router_norm, eps) * inv_h, L.altup_router))


def forward(cfg: Gemma3nConfig, w: Weights, ops, tokens, pos0: int, caches, logits: str = "last", embeds=None):
    """Run `tokens` (positions pos0...) through the model, updating `caches`.

    embeds: optional soft rows (models._inputs.SoftRows) that replace the scaled token
    embeddings of those chunk rows; their per-layer inputs then come from the projection of
    the soft rows plus the PLE row of their placeholder id (row 0 for ids past the PLE
    vocabulary), as transformers' Gemma3nModel does.

    logits: "last" -> [vocab] for the final token, "all" -> [n, vocab], "none" -> None,
    "hidden" -> [n, hidden] final-norm hidden states (no head),
    or an int k -> [n - k, vocab] for positions k.. of the chunk.
    """
    import numpy as np

    f32 = np.float32
    tokens = np.asarray(tokens, dtype=np.int32)
    n = tokens.shape[0]
    H, KV, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    h, A, P, NL = cfg.hidden_size, cfg.altup_num_inputs, cfg.hidden_size_per_layer_input, cfg.num_layers
    act = cfg.altup_active_idx
    positions = np.arange(pos0, pos0 + n, dtype=np.int64)
    inv_h = f32(1.0 / h)
    inv_sqrt2 = f32(1.0 / math.sqrt(2.0))

    # ---- embeddings and per-layer inputs
    x0 = ops.embed(tokens, w.embed) * f32(h ** 0.5)
    for m in cfg.modalities:  # a kept modality's hard tokens (<end_of_image>, ...) use its embedder
        hard = np.nonzero((tokens >= m.vocab_offset) & (tokens < m.vocab_offset + m.vocab_size))[0]
        if hard.size:
            x0 = ops.splice(x0, hard, hard_token_rows(cfg, w, ops, m, tokens[hard]))
    x0 = splice(ops, x0, embeds)  # [n, h]
    ple_ids = np.where(tokens < cfg.vocab_size_per_layer_input, tokens, 0).astype(np.int32)
    ple = (ops.embed(ple_ids, w.ple) * f32(P ** 0.5)).reshape(n, NL, P)  # only these rows are read
    proj = (ops.matmul(x0, w.ple_proj) * f32(h ** -0.5)).reshape(n, NL, P)
    per_layer = (ops.rmsnorm(proj, w.ple_proj_norm, eps) + ple) * inv_sqrt2  # [n, NL, P]

    # ---- AltUp streams: [A, n, h]
    extra = ops.einsum("nah->anh", ops.matmul(x0, w.altup_proj).reshape(n, A - 1, h))
    hs = ops.concat([x0[None], ops.match_rms(extra, x0)], axis=0)

    # rows of the chunk whose logits are wanted: [keep_from, n)
    if logits in ("none", "last", "all", "hidden"):
        keep_from = {"none": n, "last": n - 1, "all": 0, "hidden": 0}[logits]
    else:
        keep_from = int(logits)
        if not 0 <= keep_from < n:
            raise ValueError(f"logits={logits!r}: the chunk has {n} tokens")
    cut = 0  # rows already dropped
    kv_src = cfg.kv_source()
    first_shared = cfg.first_kv_shared_layer
    shared: dict[int, tuple] = {}  # producer layer -> (K, V, K_pos) of this chunk
    producers = set(kv_src[first_shared:])
    for i, (L, kind) in enumerate(zip(w.layers, cfg.layer_types)):
        if i == first_shared and i > 0:
            # KV-shared layers write no state: only the rows whose logits are wanted matter.
            if keep_from >= n:
                return None
            if keep_from > 0:
                hs, positions, per_layer = hs[:, keep_from:], positions[keep_from:], per_layer[keep_from:]
                n, cut = n - keep_from, keep_from
        local = kind == LOCAL
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        rscale = 1.0 if local else cfg.rope_scaling_factor

        # AltUp predict
        coefs = ops.matmul(_router(ops, hs[act], L, eps, inv_h), L.altup_predict).reshape(n, A, A)
        pred = ops.einsum("nqk,knd->qnd", coefs, hs) + hs
        active = pred[act]

        # attention + LAuReL
        normed = ops.rmsnorm(active, L.attn_norm, eps)
        laurel = normed + ops.rmsnorm(ops.matmul(ops.matmul(normed, L.laurel_l), L.laurel_r), L.laurel_norm, eps)
        q = ops.rmsnorm(ops.matmul(normed, L.q).reshape(n, H, hd), L.q_norm, eps)
        q = ops.rope(q, positions, theta, rscale)
        if i < first_shared:
            k = ops.rmsnorm(ops.matmul(normed, L.k).reshape(n, KV, hd), L.k_norm, eps)
            k = ops.rope(k, positions, theta, rscale)
            v = ops.rmsnorm(ops.matmul(normed, L.v).reshape(n, KV, hd), w.v_norm, eps)
            K, V, kpos = caches[i].update(k, v, positions)
            if i in producers:
                shared[i] = (K, V, kpos)
        else:
            K, V, kpos = shared[kv_src[i]]
        a = ops.attention(q, K, V, positions, kpos, cfg.sliding_window if local else 0, 1.0, None)
        attn = ops.rmsnorm(ops.matmul(a, L.o), L.post_attn_norm, eps)
        x = (active + attn + laurel) * inv_sqrt2

        # FFN (Gaussian top-k sparsity on the gate where configured)
        hn = ops.rmsnorm(x, L.ffn_norm, eps)
        g = ops.matmul(hn, L.gate)
        s = cfg.activation_sparsity[i]
        if s > 0.0:
            g = ops.gaussian_topk(g, sparsity_multiplier(s))
        y = ops.matmul(ops.gelu_mul(g, ops.matmul(hn, L.up)), L.down)
        x = x + ops.rmsnorm(y, L.post_ffw_norm, eps)

        # AltUp correct
        cc = ops.matmul(_router(ops, x, L, eps, inv_h), L.altup_correct) + f32(1.0)  # [n, A]
        hs = pred + ops.einsum("na,nd->and", cc, x - active)  # every stream += its share of the innovation
        first = hs[act]
        if cfg.altup_correct_scale:
            first = first * L.altup_correct_scale
        gated = ops.gelu_mul(ops.matmul(first, L.inp_gate), per_layer[:, i, :])
        r = ops.rmsnorm(ops.matmul(gated, L.proj), L.post_norm, eps)
        hs = ops.concat([hs[:1], hs[1:] + r[None]], axis=0)  # the per-layer input joins streams 1..

    if keep_from >= n + cut:
        return None
    hs = hs[:, keep_from - cut:]
    x = hs[0]
    for j in range(1, A):
        x = x + ops.match_rms(ops.matmul(hs[j], w.altup_unembd[j - 1]), hs[0])
    x = x / f32(A)
    if logits == "hidden":
        return ops.rmsnorm(x, w.output_norm, eps)
    out = ops.matmul(ops.rmsnorm(x, w.output_norm, eps), w.embed)
    if cfg.final_logit_softcap:
        out = ops.softcap(out, cfg.final_logit_softcap)
    return out[0] if logits == "last" else out


# ----------------------------------------------------------------------------- image and audio input

def _embed_into_text(cfg: Gemma3nConfig, w: Weights, ops, m: Modality, x, norm: str):
    """Gemma3nMultimodalEmbedder: rmsnorm (hard or soft scale) -> projection to the text width
    -> rmsnorm without a scale. x: host float32 [k, m.hidden_size] -> host float32 [k, hidden]."""
    import numpy as np

    W, e = w.media[m.kind], _EMBEDDER_PREFIX[m.kind]
    y = ops.matmul(ops.rmsnorm(x, W[e + norm], m.eps), W[e + "proj"])
    return ops.to_host(ops.rmsnorm(y, np.ones(cfg.hidden_size, np.float32), m.eps))


def hard_token_rows(cfg: Gemma3nConfig, w: Weights, ops, m: Modality, ids):
    """The input rows of modality `m`'s hard tokens `ids` (host, within its id range)."""
    import numpy as np

    rows = ops.embed(np.asarray(ids, np.int32) - np.int32(m.vocab_offset), w.media[m.kind][_EMBEDDER_PREFIX[m.kind] + "embd"])
    return _embed_into_text(cfg, w, ops, m, rows, "hard_norm")


def _tower_linear(ops):
    return lambda x, t: ops.to_host(ops.matmul(x, t))


def tower_kernels(ops, kind: str) -> dict:
    """The backend kernels a tower's encode() takes: weight products and RMSNorms (both
    towers); for the image tower its attention, depthwise convolutions and the norms' GELUs,
    for the audio tower its SiLU and GLU gates."""
    kw = {"linear": _tower_linear(ops),
          "rmsnorm": lambda x, wt, eps, act=None: ops.to_host(ops.rmsnorm(x, wt, eps, act))}
    if kind == VISION:
        kw["attend"] = _tower_attend(ops)
        kw["dwconv"] = lambda x, t, s, top, left, hw: ops.to_host(ops.depthwise_conv2d(x, t, s, top, left, hw))
    else:
        kw["sigmoid_mul"] = lambda x, g: ops.to_host(ops.sigmoid_mul(x, g))
    return kw


def _tower_attend(ops):
    """Full (non-causal) attention through the backend's kernel; q comes scaled."""
    return lambda q, k, v: ops.to_host(ops.full_attention(q, k, v, 1.0))


def encode_image(cfg: Gemma3nConfig, w: Weights, ops, pixels):
    """One preprocessed image (float32 [3, H, W]) -> its soft rows, float32
    [vision.soft_tokens, hidden]: the tower's features times sqrt(tower width), then the
    embedder, as transformers' Gemma3nModel.get_image_features."""
    import numpy as np

    m = cfg.vision
    feats = _tower_module(VISION).encode(m.tower, w.media[VISION], np.asarray(pixels, np.float32),
                                         **tower_kernels(ops, VISION))
    if feats.shape != (m.soft_tokens, m.hidden_size):
        raise FormatError(f"the vision tower made {list(feats.shape)} features, the config expects "
                          f"{[m.soft_tokens, m.hidden_size]}")
    return _embed_into_text(cfg, w, ops, m, feats * np.float32(m.hidden_size ** 0.5), "soft_norm")


def encode_audio(cfg: Gemma3nConfig, w: Weights, ops, features, padding=None):
    """One clip's log-mel features (float32 [frames, mel bins]; padding: bool [frames], True
    where padded) -> its soft rows, float32 [audio.soft_tokens, hidden]: the tower's output
    through the embedder; positions the tower marks as padding, and the rows up to
    soft_tokens, take the embedding of the last hard audio token, as transformers does.
    A clip whose tower output passes soft_tokens rows is an error (the caller splits
    longer audio)."""
    import numpy as np

    m = cfg.audio
    hidden, pad = _tower_module(AUDIO).encode(m.tower, w.media[AUDIO], np.asarray(features, np.float32), padding,
                                              **tower_kernels(ops, AUDIO))
    if hidden.shape[0] > m.soft_tokens:
        raise ValueError(f"the audio tower made {hidden.shape[0]} rows, more than the {m.soft_tokens} a clip has")
    rows = np.array(_embed_into_text(cfg, w, ops, m, hidden, "soft_norm"), dtype=np.float32)
    fill = hard_token_rows(cfg, w, ops, m, [cfg.vocab_size - 1])[0]  # transformers' audio padding token
    out = np.empty((m.soft_tokens, cfg.hidden_size), np.float32)
    out[: rows.shape[0]] = rows
    out[: rows.shape[0]][np.asarray(pad, bool)] = fill
    out[rows.shape[0]:] = fill
    return out
