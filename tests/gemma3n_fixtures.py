"""Tiny random Gemma 3n checkpoints in Hugging Face layout, built locally (no hub access).

`make_tiny_gemma3n` writes a Gemma3nForCausalLM directory (config.json, model.safetensors
and the tiny BPE tokenizer of hf_fixtures); `make_tiny_gemma3n_multimodal` a
Gemma3nForConditionalGeneration one whose config carries tiny audio/vision configs and
whose safetensors also hold (fake) vision/audio tower tensors, which the importer must skip.

The default geometry has every Gemma 3n feature switched on: 10 layers in the 4 local : 1
global pattern, the last 4 sharing KV (so layers 6, 7, 8 read layer 5's cache and layer 9
reads layer 4's), activation sparsity on the first 3 layers (three different targets),
AltUp with 4 streams, LAuReL, per-layer embeddings over a smaller vocabulary than the main
one (ids past it fall back to row 0, as in transformers), per-layer FFN widths, a sliding
window of 8 and a final logit soft-cap. Every weight is random, norms included
(transformers initialises most norm scales to 1 and AltUp's correct_output_scale to 0,
which would hide mistakes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402

LAYERS = 10
SLIDING_WINDOW = 8
KV_SHARED = 4


def text_config_kwargs(
    *,
    layers: int = LAYERS,
    vocab_size: int = 320,
    vocab_size_per_layer_input: int = 300,
    hidden_size: int = 64,
    intermediate_size=None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    hidden_size_per_layer_input: int = 16,
    laurel_rank: int = 8,
    sliding_window: int = SLIDING_WINDOW,
    num_kv_shared_layers: int = KV_SHARED,
    activation_sparsity_pattern=None,
    final_logit_softcapping: float | None = 5.0,
    pattern: int = 5,
) -> dict:
    if intermediate_size is None:
        intermediate_size = [128 if i % 2 == 0 else 96 for i in range(layers)]
    if activation_sparsity_pattern is None:
        sp = [0.95, 0.9, 0.8]
        activation_sparsity_pattern = (sp + [0.0] * layers)[:layers]
    return dict(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size_per_layer_input,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size_per_layer_input=hidden_size_per_layer_input,
        laurel_rank=laurel_rank,
        sliding_window=sliding_window,
        num_kv_shared_layers=num_kv_shared_layers,
        activation_sparsity_pattern=activation_sparsity_pattern,
        final_logit_softcapping=final_logit_softcapping,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 40_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        max_position_embeddings=1024,
        pad_token_id=fx.PAD,
        eos_token_id=[fx.EOS, fx.EOT],
        bos_token_id=fx.BOS,
        initializer_range=0.1,
    )


def randomize_(model, seed: int, std: float = 0.1) -> None:
    """N(0, std) for matrices; 1-D scales uniform in ±[0.5, 1.5] (non-trivial, sign included)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                mag = torch.rand(p.shape, generator=g) + 0.5
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0)
                p.copy_(mag * sign)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_tiny_gemma3n(dir: str | Path, *, seed: int = 0, dtype: str = "float32", with_tokenizer: bool = True,
                      **kw) -> Path:
    """A tiny random Gemma3nForCausalLM saved with save_pretrained(safe_serialization=True)."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        fx.write_tokenizer(d)
    cfg = Gemma3nTextConfig(**text_config_kwargs(**kw))
    torch.manual_seed(seed)
    model = Gemma3nForCausalLM(cfg).eval()
    randomize_(model, seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(d, safe_serialization=True)
    return d


def make_tiny_gemma3n_multimodal(dir: str | Path, *, seed: int = 0, **kw) -> Path:
    """A Gemma3nForConditionalGeneration-style directory: the text decoder's weights under
    `model.language_model.`, plus stand-in vision/audio tower tensors and multimodal
    embedders (instantiating the real towers needs timm, so they are written directly)."""
    import json

    import torch
    from safetensors.torch import save_file

    d = Path(dir)
    tmp = d.parent / (d.name + "-text")
    make_tiny_gemma3n(tmp, seed=seed, **kw)
    d.mkdir(parents=True, exist_ok=True)
    sd = fx.raw_state_dict(tmp)
    out = {}
    for k, v in sd.items():
        assert k.startswith("model.") or k == "lm_head.weight", k
        if k.startswith("model."):
            out["model.language_model." + k[len("model."):]] = v
    g = torch.Generator().manual_seed(seed + 1)
    for k, shape in {
        "model.vision_tower.timm_model.conv_stem.conv.weight": (8, 3, 3, 3),
        "model.audio_tower.subsample_conv_projection.input_proj_linear.weight": (16, 32),
        "model.embed_vision.embedding.weight": (8, 16),
        "model.embed_vision.embedding_projection.weight": (64, 16),
        "model.embed_audio.embedding.weight": (8, 16),
    }.items():
        out[k] = torch.randn(shape, generator=g)
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    tc = json.loads((tmp / "config.json").read_text())
    tc.pop("architectures", None)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tmp / f).exists():
            (d / f).write_bytes((tmp / f).read_bytes())
    cfg = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": tc,
        "vision_config": {"model_type": "gemma3n_vision", "hidden_size": 16},
        "audio_config": {"model_type": "gemma3n_audio", "hidden_size": 16},
        "tie_word_embeddings": True,
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


def load_reference(d: str | Path):
    """The checkpoint as a float32 transformers Gemma3nForCausalLM with eager attention."""
    import torch
    from transformers import Gemma3nForCausalLM

    return Gemma3nForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
