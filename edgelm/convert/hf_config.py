"""Hugging Face config.json -> edgelm model config, for each architecture the importer reads.

Gemma 3: model types gemma3_text (Gemma3ForCausalLM: weights under `model.`) and gemma3
(Gemma3ForConditionalGeneration: the text decoder from `text_config`). Gemma 3n: model types
gemma3n_text and gemma3n, likewise. A field a config omits has transformers' default.
"""

from __future__ import annotations

from ..errors import FormatError
from ..models import gemma3, gemma3n
from ..models._config import GLOBAL, LOCAL, layer_pattern

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
    pattern = tc.get("sliding_window_pattern", tc.get("_sliding_window_pattern", gemma3.GLOBAL_EVERY))
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
        raise FormatError(f"{where}: field 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
    return layer_pattern(n_layers, pattern)


def _text_config(cfg: dict, where: str, notes: list[str], text_type: str, defaults: str) -> tuple[dict, str]:
    """The text decoder's config inside a multimodal config.json (its text_config), and where it is."""
    tc = cfg.get("text_config")
    if tc is None:
        tc = {}
        notes.append(f"config: no text_config; using transformers' {defaults}")
    if not isinstance(tc, dict):
        raise FormatError(f"{where}: field 'text_config' must be an object")
    where = f"{where} text_config"
    if tc.get("model_type", text_type) != text_type:
        raise FormatError(f"{where}: model_type {tc.get('model_type')!r} is not supported (expected {text_type})")
    return tc, where


def text_config_from_hf(cfg: dict, where: str = "config.json") -> tuple[dict, dict, list[str]]:
    """HF config.json dict -> (edgelm Gemma3Config dict, the HF text config, notes)."""
    notes: list[str] = []
    model_type = cfg.get("model_type")
    if model_type == "gemma3_text":
        tc = cfg
    elif model_type == "gemma3":
        tc, where = _text_config(cfg, where, notes, "gemma3_text", "Gemma3TextConfig defaults")
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
        out = gemma3.Gemma3Config.from_dict(out).to_dict()
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    return out, tc, notes


# ----------------------------------------------------------------------------- Gemma 3n

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


def gemma3n_config_from_hf(cfg: dict, where: str = "config.json",
                           keep: tuple[str, ...] = ("vision", "audio")) -> tuple[dict, dict, list[str]]:
    """HF Gemma 3n config.json dict -> (edgelm Gemma3nConfig dict, the HF text config, notes).
    keep: the modalities whose towers the import keeps (of a gemma3n checkpoint that has them)."""
    notes: list[str] = []
    where_top = where
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
        tc, where = _text_config(cfg, where, notes, "gemma3n_text", "Gemma3nTextConfig defaults (E4B)")
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
    if lt is not None:
        layer_types = _layer_types(tc, n_layers, where)
    else:
        layer_types = layer_pattern(n_layers, gemma3n.GLOBAL_EVERY)
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
    if model_type == "gemma3n":
        for kind in (gemma3n.VISION, gemma3n.AUDIO):
            if kind in keep:
                out[kind] = _modality_from_hf(cfg, kind, where_top)
    try:
        out = gemma3n.Gemma3nConfig.from_dict(out).to_dict()
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    return out, tc, notes


# Gemma3nConfig's defaults for the multimodal prompt tokens and the towers' embedders.
GEMMA3N_MM_DEFAULTS = {
    "vision": {"token_id": ("image_token_id", 262_145), "begin_id": ("boi_token_id", 255_999),
               "end_id": ("eoi_token_id", 262_144), "soft_tokens": ("vision_soft_tokens_per_image", 256),
               "vocab_offset": 262_144, "vocab_size": 128, "hidden_size": 2048, "rms_norm_eps": 1e-6},
    "audio": {"token_id": ("audio_token_id", 262_273), "begin_id": ("boa_token_id", 256_000),
              "end_id": ("eoa_token_id", 262_272), "soft_tokens": ("audio_soft_tokens_per_image", 188),
              "vocab_offset": 262_272, "vocab_size": 128, "hidden_size": 1536, "rms_norm_eps": 1e-6},
}


def _modality_from_hf(cfg: dict, kind: str, where: str) -> dict | None:
    """The Modality dict of a gemma3n config.json: prompt token ids from the top level, the
    embedder's fields and the tower from `vision_config` / `audio_config` (None if absent)."""
    sub = cfg.get(f"{kind}_config")
    if sub is None:
        return None
    if not isinstance(sub, dict):
        raise FormatError(f"{where}: field '{kind}_config' must be an object, got {sub!r:.80}")
    dflt = GEMMA3N_MM_DEFAULTS[kind]
    sub_where = f"{where}: {kind}_config"
    out = {"kind": kind}
    for f in ("token_id", "begin_id", "end_id", "soft_tokens"):
        key, default = dflt[f]
        out[f] = _check_num(cfg.get(key, default), key, where)
    for f in ("vocab_offset", "vocab_size", "hidden_size"):
        out[f] = _check_num(sub.get(f, dflt[f]), f, sub_where)
    out["eps"] = _check_num(sub.get("rms_norm_eps", dflt["rms_norm_eps"]), "rms_norm_eps", sub_where, float)
    mod = gemma3n._tower_module(kind)
    try:
        tower = (mod.VisionConfig if kind == gemma3n.VISION else mod.AudioConfig).from_hf(sub)
    except FormatError as e:
        raise FormatError(f"{sub_where}: {e}") from None
    out["tower"] = tower.to_dict()
    return out


def config_reader(model_type):
    """(model module, config reader) for an HF model_type; an unknown one gets the Gemma 3
    reader, whose error names what edgelm imports."""
    if model_type in GEMMA3N_MODEL_TYPES:
        return gemma3n, gemma3n_config_from_hf
    return gemma3, text_config_from_hf
