"""Gemma 3 text decoder (270M, 1B, 4B, ... text geometries).

Canonical tensor names (GGUF style; norms hold 1+w, folded at conversion):
  token_embd.weight [vocab, hidden]       output_norm.weight [hidden]
  blk.N.attn_norm.weight [hidden]         blk.N.attn_q.weight [heads*hd, hidden]
  blk.N.attn_k.weight [kv*hd, hidden]     blk.N.attn_v.weight [kv*hd, hidden]
  blk.N.attn_q_norm.weight [hd]           blk.N.attn_k_norm.weight [hd]
  blk.N.attn_output.weight [hidden, heads*hd]
  blk.N.post_attention_norm.weight        blk.N.ffn_norm.weight (pre-FFW)
  blk.N.ffn_gate.weight [inter, hidden]   blk.N.ffn_up.weight [inter, hidden]
  blk.N.ffn_down.weight [hidden, inter]   blk.N.post_ffw_norm.weight
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._config import (MAX_LAYERS, check_float, check_head_dim, check_heads, check_int, check_layer_types,
                      check_tensor_shapes, config_from_dict)
from ._inputs import splice

ARCH = "gemma3"
LOCAL, GLOBAL = "local", "global"


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
        check_layer_types(self, (LOCAL, GLOBAL), lambda n: default_layer_types(n, 6))
        # a model without sliding-window layers has no window (the importers write 0)
        check_int(self, "sliding_window", lo=1 if LOCAL in self.layer_types else 0)

    @classmethod
    def from_dict(cls, d: dict) -> "Gemma3Config":
        return config_from_dict(cls, d, ARCH)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d


def default_layer_types(n_layers: int, pattern: int) -> tuple[str, ...]:
    """Every `pattern`-th layer is global, the rest sliding-window (5:1 for Gemma 3)."""
    return tuple(GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n_layers))


# ----------------------------------------------------------------------------- weights

def tensor_shapes(cfg: Gemma3Config) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind) for every tensor of the model, in bundle order.
    Kinds are SourceTensor kinds: embed, linear, norm."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out = {"token_embd.weight": ((cfg.vocab_size, h), "embed")}
    per = {
        "attn_norm.weight": ((h,), "norm"),
        "attn_q.weight": ((q, h), "linear"),
        "attn_k.weight": ((kv, h), "linear"),
        "attn_v.weight": ((kv, h), "linear"),
        "attn_q_norm.weight": ((hd,), "norm"),
        "attn_k_norm.weight": ((hd,), "norm"),
        "attn_output.weight": ((h, q), "linear"),
        "post_attention_norm.weight": ((h,), "norm"),
        "ffn_norm.weight": ((h,), "norm"),
        "ffn_gate.weight": ((inter, h), "linear"),
        "ffn_up.weight": ((inter, h), "linear"),
        "ffn_down.weight": ((h, inter), "linear"),
        "post_ffw_norm.weight": ((h,), "norm"),
    }
    for i in range(cfg.num_layers):
        for k, v in per.items():
            out[f"blk.{i}.{k}"] = v
    out["output_norm.weight"] = ((h,), "norm")
    return out


def check_tensors(cfg: Gemma3Config, bundle) -> None:
    """The bundle's tensor table against the config: every tensor present, with the shape the
    config implies (FormatError naming the tensor otherwise)."""
    check_tensor_shapes(tensor_shapes(cfg), bundle)


_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm", "o": "attn_output", "post_attn_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "post_ffw_norm": "post_ffw_norm",
}


@dataclass(frozen=True)
class Layer:
    attn_norm: object
    q: object
    k: object
    v: object
    q_norm: object
    k_norm: object
    o: object
    post_attn_norm: object
    ffn_norm: object
    gate: object
    up: object
    down: object
    post_ffw_norm: object


@dataclass(frozen=True)
class Weights:
    embed: object  # QTensor [vocab, hidden]; also the tied output head
    output_norm: object  # float32 [hidden]
    layers: tuple


def load_weights(cfg: Gemma3Config, bundle) -> Weights:
    """Views into the bundle's mmap: nothing is copied. Norms become plain fp32 arrays."""

    def norm(name):
        return bundle.tensor(name).parts["w"]

    layers = []
    for i in range(cfg.num_layers):
        kw = {}
        for field_name, short in _LAYER_TENSORS.items():
            name = f"blk.{i}.{short}.weight"
            kw[field_name] = norm(name) if field_name.endswith("norm") else bundle.tensor(name)
        layers.append(Layer(**kw))
    return Weights(bundle.tensor("token_embd.weight"), norm("output_norm.weight"), tuple(layers))


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
    or an int k -> [n - k, vocab] for positions k.. of the chunk (skips the head for the rest).
    """
    import numpy as np

    tokens = np.asarray(tokens, dtype=np.int32)
    n = tokens.shape[0]
    H, KV, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    positions = np.arange(pos0, pos0 + n, dtype=np.int64)
    scale = cfg.query_pre_attn_scalar ** -0.5

    x = splice(ops.embed(tokens, w.embed) * np.float32(cfg.hidden_size ** 0.5), embeds)  # [n, hidden]
    layers = w.layers
    h = ops.rmsnorm(x, layers[0].attn_norm, eps)  # the first block's input
    # Every block in one native call where the op table has it (bitwise this loop). It saves
    # ~9 Python->C++ calls per layer and, for prefill chunks, a fresh numpy allocation (page
    # faults included) per intermediate: 1.18-1.26x faster prefill, no higher peak RSS.
    if "gemma3_blocks" in ops.fused_plans and ops.gemma3_blocks(cfg, w, x, h, positions, caches):
        layers = ()
    for i, (L, kind, cache) in enumerate(zip(layers, cfg.layer_types, caches)):
        local = kind == LOCAL
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        rscale = 1.0 if local else cfg.rope_scaling_factor

        q, k, v = ops.matmul_multi(h, (L.q, L.k, L.v))  # one job, h quantized once
        q = ops.rmsnorm_rope(q.reshape(n, H, hd), L.q_norm, eps, positions, theta, rscale)
        k = ops.rmsnorm_rope(k.reshape(n, KV, hd), L.k_norm, eps, positions, theta, rscale)
        v = v.reshape(n, KV, hd)
        K, V, kpos = cache.update(k, v, positions)
        a = ops.attention(q, K, V, positions, kpos, cfg.sliding_window if local else 0, scale, cfg.attn_logit_softcap)
        # residual + post-attention norm, fused with the pre-FFW norm of the sum
        x, h = ops.add_rmsnorm(x, ops.matmul(a, L.o), L.post_attn_norm, eps, L.ffn_norm)

        f = ops.matmul(ops.matmul_gelu_mul(h, L.gate, L.up), L.down)
        # residual + post-FFW norm, fused with the next block's input norm (or the final norm)
        nxt = layers[i + 1].attn_norm if i + 1 < len(layers) else (w.output_norm if logits != "none" else None)
        x, h = ops.add_rmsnorm(x, f, L.post_ffw_norm, eps, nxt)

    if logits == "none":
        return None
    if logits == "last":
        h = h[-1:]
    elif not isinstance(logits, str):
        h = h[int(logits):]
    out = ops.matmul(h, w.embed)  # h = rmsnorm(x) * output_norm
    if cfg.final_logit_softcap:
        out = ops.softcap(out, cfg.final_logit_softcap)
    return out[0] if logits == "last" else out
Config = Gemma3Config
