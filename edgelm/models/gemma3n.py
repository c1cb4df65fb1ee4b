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

Canonical tensor names (llama.cpp's gemma3n names where it has them; A = altup_num_inputs,
L = num_layers, P = hidden_size_per_layer_input, I_n = layer n's FFN width, r = laurel rank):

  token_embd.weight            [vocab, hidden]        (also the output head)
  per_layer_token_embd.weight  [vocab_per_layer, L*P] (tensor kind "ple": its own scheme)
  per_layer_model_proj.weight  [L*P, hidden]
  per_layer_proj_norm.weight   [P]
  altup_proj.weight            [(A-1)*hidden, hidden] (the A-1 projections stacked by rows)
  altup_unembd_proj.weight     [(A-1)*hidden, hidden] (likewise)
  output_norm.weight           [hidden]
  blk.N.attn_norm.weight [hidden]          blk.N.attn_q.weight [heads*hd, hidden]
  blk.N.attn_k.weight [kv*hd, hidden]      blk.N.attn_v.weight [kv*hd, hidden]   (not in shared layers)
  blk.N.attn_q_norm.weight [hd]            blk.N.attn_k_norm.weight [hd]         (k: not in shared layers)
  blk.N.attn_output.weight [hidden, heads*hd]
  blk.N.post_attention_norm.weight         blk.N.ffn_norm.weight (pre-FFW)
  blk.N.ffn_gate.weight [I_n, hidden]      blk.N.ffn_up.weight [I_n, hidden]
  blk.N.ffn_down.weight [hidden, I_n]      blk.N.post_ffw_norm.weight
  blk.N.altup_predict_coef.weight [A*A, A] blk.N.altup_correct_coef.weight [A, A]
  blk.N.altup_router.weight [A, hidden]    blk.N.altup_router_norm.weight [hidden]
  blk.N.altup_correct_scale.weight [hidden]
  blk.N.laurel_l.weight [r, hidden]        blk.N.laurel_r.weight [hidden, r]
  blk.N.laurel_post_norm.weight [hidden]
  blk.N.inp_gate.weight [P, hidden]        blk.N.proj.weight [hidden, P]
  blk.N.post_norm.weight [hidden]          (post per-layer-input norm)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist

from ..errors import FormatError
from ._config import (INT_MAX, MAX_LAYERS, bad, check_bool, check_float, check_head_dim, check_heads,
                      check_int, check_layer_types, check_tensor_shapes, config_from_dict, is_int)
from ._inputs import splice

ARCH = "gemma3n"
LOCAL, GLOBAL = "local", "global"


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
        check_layer_types(self, (LOCAL, GLOBAL), lambda n: tuple(GLOBAL if (i + 1) % 5 == 0 else LOCAL
                                                                  for i in range(n)))
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
        return d


Config = Gemma3nConfig


# ----------------------------------------------------------------------------- weights

_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm", "o": "attn_output", "post_attn_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "post_ffw_norm": "post_ffw_norm",
    "altup_predict": "altup_predict_coef", "altup_correct": "altup_correct_coef",
    "altup_router": "altup_router", "altup_router_norm": "altup_router_norm",
    "altup_correct_scale": "altup_correct_scale",
    "laurel_l": "laurel_l", "laurel_r": "laurel_r", "laurel_norm": "laurel_post_norm",
    "inp_gate": "inp_gate", "proj": "proj", "post_norm": "post_norm",
}
_NORMS = {"attn_norm", "q_norm", "k_norm", "post_attn_norm", "ffn_norm", "post_ffw_norm", "altup_router_norm",
          "altup_correct_scale", "laurel_norm", "post_norm"}
_KV_ONLY = {"k", "v", "k_norm"}  # absent from KV-shared layers


def tensor_shapes(cfg: Gemma3nConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Canonical name -> (shape, kind) for every tensor of the model, in bundle order.
    Kinds are SourceTensor kinds: embed, ple, linear, norm, other (fp32)."""
    h, hd, A, P, r = cfg.hidden_size, cfg.head_dim, cfg.altup_num_inputs, cfg.hidden_size_per_layer_input, cfg.laurel_rank
    q, kv, L = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_layers
    out = {
        "token_embd.weight": ((cfg.vocab_size, h), "embed"),
        "per_layer_token_embd.weight": ((cfg.vocab_size_per_layer_input, L * P), "ple"),
        "per_layer_model_proj.weight": ((L * P, h), "linear"),
        "per_layer_proj_norm.weight": ((P,), "norm"),
        "altup_proj.weight": (((A - 1) * h, h), "linear"),
        "altup_unembd_proj.weight": (((A - 1) * h, h), "linear"),
    }
    first_shared = cfg.first_kv_shared_layer
    for i in range(L):
        inter = cfg.intermediate_size[i]
        per = {
            "attn_norm": ((h,), "norm"),
            "attn_q": ((q, h), "linear"),
            "attn_k": ((kv, h), "linear"),
            "attn_v": ((kv, h), "linear"),
            "attn_q_norm": ((hd,), "norm"),
            "attn_k_norm": ((hd,), "norm"),
            "attn_output": ((h, q), "linear"),
            "post_attention_norm": ((h,), "norm"),
            "ffn_norm": ((h,), "norm"),
            "ffn_gate": ((inter, h), "linear"),
            "ffn_up": ((inter, h), "linear"),
            "ffn_down": ((h, inter), "linear"),
            "post_ffw_norm": ((h,), "norm"),
            "altup_predict_coef": ((A * A, A), "other"),
            "altup_correct_coef": ((A, A), "other"),
            "altup_router": ((A, h), "other"),
            "altup_router_norm": ((h,), "norm"),
            "altup_correct_scale": ((h,), "norm"),
            "laurel_l": ((r, h), "linear"),
            "laurel_r": ((h, r), "linear"),
            "laurel_post_norm": ((h,), "norm"),
            "inp_gate": ((P, h), "linear"),
            "proj": ((h, P), "linear"),
            "post_norm": ((h,), "norm"),
        }
        for short, v in per.items():
            if i >= first_shared and short in ("attn_k", "attn_v", "attn_k_norm"):
                continue
            out[f"blk.{i}.{short}.weight"] = v
    out["output_norm.weight"] = ((h,), "norm")
    return out


def check_tensors(cfg: Gemma3nConfig, bundle) -> None:
    """The bundle's tensor table against the config: every tensor present, with the shape the
    config implies (FormatError naming the tensor otherwise)."""
    check_tensor_shapes(tensor_shapes(cfg), bundle)


@dataclass(frozen=True)
class Layer:
    attn_norm: object
    q: object
    k: object  # None in KV-shared layers (likewise v, k_norm)
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
    altup_predict: object
    altup_correct: object
    altup_router: object
    altup_router_norm: object
    altup_correct_scale: object
    laurel_l: object
    laurel_r: object
    laurel_norm: object
    inp_gate: object
    proj: object
    post_norm: object


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


def _row_view(t, lo: int, hi: int):
    """Rows [lo, hi) of a QTensor, as a view (every scheme stores its parts row-major)."""
    from ..quant.schemes import QTensor

    parts = {k: v[lo:hi] for k, v in t.parts.items()}
    return QTensor(t.scheme, (hi - lo,) + tuple(t.shape[1:]), parts)


def load_weights(cfg: Gemma3nConfig, bundle) -> Weights:
    """Views into the bundle's mmap: nothing is copied. Norms become plain fp32 arrays."""
    import numpy as np

    def norm(name):
        return bundle.tensor(name).parts["w"]

    first_shared = cfg.first_kv_shared_layer
    layers = []
    for i in range(cfg.num_layers):
        kw = {}
        for field_name, short in _LAYER_TENSORS.items():
            name = f"blk.{i}.{short}.weight"
            if i >= first_shared and field_name in _KV_ONLY:
                kw[field_name] = None
            elif field_name in _NORMS:
                kw[field_name] = norm(name)
            else:
                kw[field_name] = bundle.tensor(name)
        layers.append(Layer(**kw))
    h, A = cfg.hidden_size, cfg.altup_num_inputs
    unembd = bundle.tensor("altup_unembd_proj.weight")
    return Weights(
        embed=bundle.tensor("token_embd.weight"),
        ple=bundle.tensor("per_layer_token_embd.weight"),
        ple_proj=bundle.tensor("per_layer_model_proj.weight"),
        ple_proj_norm=norm("per_layer_proj_norm.weight"),
        altup_proj=bundle.tensor("altup_proj.weight"),
        altup_unembd=tuple(_row_view(unembd, j * h, (j + 1) * h) for j in range(A - 1)),
        output_norm=norm("output_norm.weight"),
        layers=tuple(layers),
        v_norm=np.ones(cfg.head_dim, dtype=np.float32),
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


def _rms(x):
    import numpy as np

    return np.sqrt(np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32))


def _router(ops, x, L, eps, inv_h):
    import numpy as np

    return np.tanh(ops.matmul(ops.rmsnorm(x, L.altup_router_norm, eps) * inv_h, L.altup_router))


def forward(cfg: Gemma3nConfig, w: Weights, ops, tokens, pos0: int, caches, logits: str = "last", embeds=None):
    """Run `tokens` (positions pos0...) through the model, updating `caches`.

    embeds: optional soft rows (models._inputs.SoftRows) that replace the scaled token
    embeddings of those chunk rows; their per-layer inputs then come from the projection of
    the soft rows plus the PLE row of their placeholder id (row 0 for ids past the PLE
    vocabulary), as transformers' Gemma3nModel does.

    logits: "last" -> [vocab] for the final token, "all" -> [n, vocab], "none" -> None,
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
    x0 = splice(ops.embed(tokens, w.embed) * f32(h ** 0.5), embeds)  # [n, h]
    ple_ids = np.where(tokens < cfg.vocab_size_per_layer_input, tokens, 0).astype(np.int32)
    ple = (ops.embed(ple_ids, w.ple) * f32(P ** 0.5)).reshape(n, NL, P)  # only these rows are read
    proj = (ops.matmul(x0, w.ple_proj) * f32(h ** -0.5)).reshape(n, NL, P)
    per_layer = (ops.rmsnorm(proj, w.ple_proj_norm, eps) + ple) * inv_sqrt2  # [n, NL, P]

    # ---- AltUp streams: [A, n, h]
    target = _rms(x0)
    extra = ops.matmul(x0, w.altup_proj).reshape(n, A - 1, h).transpose(1, 0, 2)
    extra = extra * (target / np.sqrt(np.maximum(np.mean(extra * extra, axis=-1, keepdims=True), f32(1e-5))))
    hs = np.concatenate([x0[None], extra], axis=0).astype(np.float32, copy=False)

    # rows of the chunk whose logits are wanted: [keep_from, n)
    if logits in ("none", "last", "all"):
        keep_from = {"none": n, "last": n - 1, "all": 0}[logits]
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
        pred = np.einsum("nqk,knd->qnd", coefs, hs).astype(np.float32, copy=False) + hs
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
            cutoff = g.mean(axis=-1, keepdims=True) + g.std(axis=-1, keepdims=True) * f32(sparsity_multiplier(s))
            g = np.maximum(g - cutoff, f32(0.0))
        y = ops.matmul(ops.gelu_mul(g, ops.matmul(hn, L.up)), L.down)
        x = x + ops.rmsnorm(y, L.post_ffw_norm, eps)

        # AltUp correct
        cc = ops.matmul(_router(ops, x, L, eps, inv_h), L.altup_correct) + f32(1.0)  # [n, A]
        innovation = x - pred[act]
        hs = pred + cc.T[:, :, None] * innovation[None]
        first = hs[act]
        if cfg.altup_correct_scale:
            first = first * L.altup_correct_scale
        gated = ops.gelu_mul(ops.matmul(first, L.inp_gate), per_layer[:, i, :])
        hs[1:] += ops.rmsnorm(ops.matmul(gated, L.proj), L.post_norm, eps)

    if keep_from >= n + cut:
        return None
    hs = hs[:, keep_from - cut:]
    target = _rms(hs[0])
    acc = hs[0].copy()
    for j in range(1, A):
        p = ops.matmul(hs[j], w.altup_unembd[j - 1])
        acc += p * (target / np.sqrt(np.maximum(np.mean(p * p, axis=-1, keepdims=True), f32(1e-5))))
    x = acc / f32(A)
    out = ops.matmul(ops.rmsnorm(x, w.output_norm, eps), w.embed)
    if cfg.final_logit_softcap:
        out = ops.softcap(out, cfg.final_logit_softcap)
    return out[0] if logits == "last" else out
