"""Gemma 3 text decoder (270M, 1B, 4B, ... text geometries).

Everything this runtime knows of the architecture is here: the config, the tensor table
(canonical GGUF-style names, shapes, kinds and Hugging Face names; norms hold 1 + w, folded
at conversion by from_hf), the layer pattern, weight loading, cache specs and the forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._config import (GLOBAL, LOCAL, MAX_LAYERS, TensorRow, build_table, check_float, check_head_dim, check_heads,
                      check_int, check_layer_types, config_from_dict, layer_pattern, shapes_of)
from ._inputs import splice

ARCH = "gemma3"
TITLE = "Gemma 3"
GLOBAL_EVERY = 6  # every 6th layer is global, the rest sliding-window (5:1)


@dataclass(frozen=True, kw_only=True)
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
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
    query_pre_attn_scalar: float = 256.0
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_position_embeddings: int = 32768

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "max_position_embeddings"):
            check_int(self, f)
        check_int(self, "num_layers", hi=MAX_LAYERS)
        check_heads(self)
        check_head_dim(self)
        for f in ("rms_norm_eps", "rope_theta", "rope_local_theta", "rope_scaling_factor", "query_pre_attn_scalar"):
            check_float(self, f)
        for f in ("final_logit_softcap", "attn_logit_softcap"):
            check_float(self, f, optional=True, zero_ok=True)  # null or 0: no soft-cap
        check_layer_types(self, (LOCAL, GLOBAL), lambda n: layer_pattern(n, GLOBAL_EVERY))
        # a model without sliding-window layers has no window (the importers write 0)
        check_int(self, "sliding_window", lo=1 if LOCAL in self.layer_types else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        return config_from_dict(cls, d, ARCH)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


# ----------------------------------------------------------------------------- weights

# Every tensor of the model, one row each: Weights/Layer field, canonical name (per-layer:
# after "blk.N."), Hugging Face name (per-layer: after "layers.N."), kind, shape.
GLOBAL_TENSORS = (
    TensorRow("embed", "token_embd.weight", "embed_tokens.weight", "embed", ("vocab", "h")),
)
LAYER_TENSORS = (
    TensorRow("attn_norm", "attn_norm.weight", "input_layernorm.weight", "norm", ("h",)),
    TensorRow("q", "attn_q.weight", "self_attn.q_proj.weight", "linear", ("q", "h")),
    TensorRow("k", "attn_k.weight", "self_attn.k_proj.weight", "linear", ("kv", "h")),
    TensorRow("v", "attn_v.weight", "self_attn.v_proj.weight", "linear", ("kv", "h")),
    TensorRow("q_norm", "attn_q_norm.weight", "self_attn.q_norm.weight", "norm", ("hd",)),
    TensorRow("k_norm", "attn_k_norm.weight", "self_attn.k_norm.weight", "norm", ("hd",)),
    TensorRow("o", "attn_output.weight", "self_attn.o_proj.weight", "linear", ("h", "q")),
    TensorRow("post_attn_norm", "post_attention_norm.weight", "post_attention_layernorm.weight", "norm", ("h",)),
    TensorRow("ffn_norm", "ffn_norm.weight", "pre_feedforward_layernorm.weight", "norm", ("h",)),
    TensorRow("gate", "ffn_gate.weight", "mlp.gate_proj.weight", "linear", ("inter", "h")),
    TensorRow("up", "ffn_up.weight", "mlp.up_proj.weight", "linear", ("inter", "h")),
    TensorRow("down", "ffn_down.weight", "mlp.down_proj.weight", "linear", ("h", "inter")),
    TensorRow("post_ffw_norm", "post_ffw_norm.weight", "post_feedforward_layernorm.weight", "norm", ("h",)),
)
FINAL_TENSORS = (
    TensorRow("output_norm", "output_norm.weight", "norm.weight", "norm", ("h",)),
)
# GGUF name of a canonical name where they differ: none (the canonical names are llama.cpp's)
GGUF_NAMES: dict[str, str] = {}
# Hugging Face tensors a text import skips: the vision tower and multi-modal projector
HF_SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.", "vision_model.")
HF_SKIPPED = "vision tower / multi-modal projector tensors (text-only import)"


def dims(cfg: Gemma3Config, layer: int | None) -> dict[str, int]:
    """The dimension names of the table's shapes."""
    return {"vocab": cfg.vocab_size, "h": cfg.hidden_size, "hd": cfg.head_dim, "inter": cfg.intermediate_size,
            "q": cfg.num_heads * cfg.head_dim, "kv": cfg.num_kv_heads * cfg.head_dim}


def tensor_table(cfg: Gemma3Config) -> dict:
    """Canonical name -> Tensor (shape, kind, HF name, layer, field) for every tensor, in bundle order."""
    return build_table(cfg, dims, GLOBAL_TENSORS, LAYER_TENSORS, FINAL_TENSORS)


def tensor_shapes(cfg: Gemma3Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind) for every tensor of the model, in bundle order.
    Kinds are SourceTensor kinds: embed, linear, norm."""
    return shapes_of(tensor_table(cfg))


def from_hf(kind: str, w):
    """A float32 tensor read from a Hugging Face checkpoint -> as stored: Gemma's RMSNorm
    scales by (1 + w), so norms hold 1 + w (in place)."""
    if kind == "norm":
        import numpy as np

        w += np.float32(1.0)
    return w


# One attribute per LAYER_TENSORS row: views into the bundle's mmap, norms as fp32 arrays.
Layer = dataclasses.make_dataclass("Layer", [(r.field, object) for r in LAYER_TENSORS], frozen=True)


@dataclass(frozen=True)
class Weights:
    embed: object  # QTensor [vocab, hidden]; also the tied output head
    output_norm: object  # float32 [hidden]
    layers: tuple


def load_weights(cfg: Gemma3Config, bundle) -> Weights:
    """Views into the bundle's mmap: nothing is copied. Norms become plain fp32 arrays."""

    glob: dict = {}
    layers: list[dict] = [{} for _ in range(cfg.num_layers)]
    for name, t in tensor_table(cfg).items():
        qt = bundle.tensor(name)
        (glob if t.layer is None else layers[t.layer])[t.field] = qt.parts["w"] if t.kind == "norm" else qt
    return Weights(**glob, layers=tuple(Layer(**kw) for kw in layers))


# ----------------------------------------------------------------------------- forward

def cache_specs(cfg: Gemma3Config, capacity: int, max_chunk: int) -> list:
    """One K/V cache per layer: global layers hold `capacity` positions, sliding ones a ring."""
    from ..backends.kvcache import CacheSpec, sliding_slots

    ring = CacheSpec(sliding_slots(capacity, cfg.sliding_window, max_chunk), cfg.num_kv_heads, cfg.head_dim,
                     cfg.sliding_window)
    full = CacheSpec(capacity, cfg.num_kv_heads, cfg.head_dim)
    return [ring if t == LOCAL else full for t in cfg.layer_types]


def forward(cfg: Gemma3Config, w: Weights, ops, tokens, pos0: int, caches, logits: str = "last", embeds=None):
    """Run `tokens` (positions pos0...) through the model, updating `caches`.

    embeds: optional soft rows (models._inputs.SoftRows) that replace the scaled token
    embeddings of those chunk rows (image or audio features, as transformers merges them).

    logits: "last" -> [vocab] for the final token, "all" -> [n, vocab], "none" -> None,
    or an int k -> [n - k, vocab] for positions k.. of the chunk (skips the head for the rest),
    "hidden" -> [n, hidden]: the final-norm hidden states of every position (no head).
    """
    import numpy as np

    tokens = np.asarray(tokens, dtype=np.int32)
    n = tokens.shape[0]
    eps = cfg.rms_norm_eps
    positions = np.arange(pos0, pos0 + n, dtype=np.int64)
    scale = cfg.query_pre_attn_scalar ** -0.5

    x = splice(ops, ops.embed(tokens, w.embed) * np.float32(cfg.hidden_size ** 0.5), embeds)  # [n, hidden]
    layers = w.layers
    h = ops.rmsnorm(x, layers[0].attn_norm, eps)  # the first block's input
    # the rows whose output is wanted: past its K/V write, the last block computes only those
    # (a prefill chunk's last token, or none: ~5% of a prefill's products on the 270M)
    need = {"none": 0, "last": 1, "all": n, "hidden": n}.get(logits, n) if isinstance(logits, str) \
        else max(0, n - int(logits))
    # Every block in one native call where the op table has it (bitwise this loop). It saves
    # ~9 Python->C++ calls per layer and, for prefill chunks, a fresh numpy allocation (page
    # faults included) per intermediate: 1.18-1.26x faster prefill, no higher peak RSS.
    if "gemma3_blocks" in ops.fused_plans and ops.gemma3_blocks(cfg, w, x, h, positions, caches, need=need):
        layers = ()

    def attend(i, q, k, v, local, first=0):
        K, V, kpos = caches[i].update(k, v, positions)
        if first == n:
            return None
        return ops.attention(q[first:], K, V, positions[first:], kpos, cfg.sliding_window if local else 0, scale,
                             cfg.attn_logit_softcap)

    x, h = _blocks(cfg, w, ops, layers, x, h, positions, attend, w.output_norm if logits != "none" else None,
                   need=need)
    if logits == "none":
        return None
    h = h[h.shape[0] - need:]  # the wanted rows (the loop returns only those; the fused call, all)
    if logits == "hidden":
        return h
    out = ops.matmul(h, w.embed)  # h = rmsnorm(x) * output_norm
    if cfg.final_logit_softcap:
        out = ops.softcap(out, cfg.final_logit_softcap)
    return out[0] if logits == "last" else out


def _blocks(cfg: Gemma3Config, w: Weights, ops, layers, x, h, positions, attend, final_norm, need=None):
    """The per-op loop over `layers` (the readable definition the fused plan equals):
    attend(i, q, k, v, local, first) writes layer i's cache and returns the attention output of
    query rows first... need: only the last `need` rows' outputs are wanted; the last layer
    carries only those past its cache write, and x, h come back with those rows only."""
    n = x.shape[0]
    H, KV, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    for i, (L, kind) in enumerate(zip(layers, cfg.layer_types)):
        local = kind == LOCAL
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        rscale = 1.0 if local else cfg.rope_scaling_factor

        q, k, v = ops.matmul_multi(h, (L.q, L.k, L.v))  # one job, h quantized once
        q = ops.rmsnorm_rope(q.reshape(n, H, hd), L.q_norm, eps, positions, theta, rscale)
        k = ops.rmsnorm_rope(k.reshape(n, KV, hd), L.k_norm, eps, positions, theta, rscale)
        first = n - need if need is not None and i == len(layers) - 1 and need < n else 0
        a = attend(i, q, k, v.reshape(n, KV, hd), local, first)
        x, h = x[first:], h[first:]
        if first == n:  # nothing wanted past the last cache write
            return x, h
        # residual + post-attention norm, fused with the pre-FFW norm of the sum
        x, h = ops.add_rmsnorm(x, ops.matmul(a, L.o), L.post_attn_norm, eps, L.ffn_norm)

        f = ops.matmul(ops.matmul_gelu_mul(h, L.gate, L.up), L.down)
        # residual + post-FFW norm, fused with the next block's input norm (or the final norm)
        nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else final_norm
        x, h = ops.add_rmsnorm(x, f, L.post_ffw_norm, eps, nxt)
    return x, h


def forward_batch(cfg: Gemma3Config, w: Weights, ops, tokens, positions, caches):
    """One decode step of B sequences at once: token b at positions[b] of sequence b, whose
    caches are caches[b]. The products read each weight once for all B rows; attention runs
    per sequence over its own cache. Returns the logits [B, vocab]."""
    import numpy as np

    tokens = np.asarray(tokens, dtype=np.int32)
    positions = np.asarray(positions, dtype=np.int64)
    scale = cfg.query_pre_attn_scalar ** -0.5
    x = ops.embed(tokens, w.embed) * np.float32(cfg.hidden_size ** 0.5)
    h = ops.rmsnorm(x, w.layers[0].attn_norm, cfg.rms_norm_eps)

    def attend(i, q, k, v, local, first=0):  # every row is wanted: first is 0
        window = cfg.sliding_window if local else 0
        outs = []
        for b, cs in enumerate(caches):
            pb = positions[b:b + 1]
            K, V, kpos = cs[i].update(k[b:b + 1], v[b:b + 1], pb)
            outs.append(ops.attention(q[b:b + 1], K, V, pb, kpos, window, scale, cfg.attn_logit_softcap))
        return ops.concat(outs, axis=0)

    # every block in one native call where the op table has it (bitwise the loop below)
    layers = w.layers
    if "gemma3_blocks" in ops.fused_plans and ops.gemma3_blocks(cfg, w, x, h, positions, caches,
                                                                 seq_rows=[1] * len(caches)):
        layers = ()
    x, h = _blocks(cfg, w, ops, layers, x, h, positions, attend, w.output_norm)
    out = ops.matmul(h, w.embed)
    if cfg.final_logit_softcap:
        out = ops.softcap(out, cfg.final_logit_softcap)
    return out


Config = Gemma3Config
