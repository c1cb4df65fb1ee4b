"""Tiny random Gemma 3 checkpoints in Hugging Face layout, built locally (no hub access).

`make_tiny_gemma3` writes a Gemma3ForCausalLM directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, ...); `make_tiny_gemma3_multimodal` writes a
Gemma3ForConditionalGeneration one with a tiny SigLIP vision tower. Every weight is
random, norms included (transformers initialises RMSNorm weights to 0, which would hide
a missing 1 + w fold).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD, EOS, BOS, UNK, SOT, EOT = range(len(SPECIALS))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny tokenizer for testing edgelm.",
    "Gemma is a family of lightweight open models.",
    "Sliding window attention looks at the most recent tokens only.",
    "Every sixth layer attends globally; the others attend locally.",
    "What is the capital of France? Paris is the capital of France.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "user model assistant system hello goodbye thanks please",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TOKENIZER_VOCAB = 256  # target size of the trained BPE vocabulary


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB, extra_alphabet: str = ""):
    """A small Gemma-like BPE tokenizer (specials at Gemma's ids 0..3, then the turn markers).
    Its alphabet is printable ASCII plus `extra_alphabet` (e.g. "\n")."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Replace("\u2581", " ")
    alphabet = [chr(c) for c in range(33, 127)] + ["\u2581"] + list(extra_alphabet)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def write_tokenizer(d: str | Path, vocab_size: int = TOKENIZER_VOCAB, extra_alphabet: str = "") -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the vocab size."""
    d = Path(d)
    tok = build_tokenizer(vocab_size, extra_alphabet)
    tok.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")}
    (d / "special_tokens_map.json").write_text(json.dumps(smap, indent=2), encoding="utf-8")
    return tok.get_vocab_size()


def text_config_kwargs(
    *,
    layers: int = 7,
    sliding_window: int = 16,
    rope_scaling: dict | None = None,
    final_logit_softcapping: float | None = None,
    attn_logit_softcapping: float | None = None,
    vocab_size: int = 288,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    sliding_window_pattern: int = 3,
) -> dict:
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        sliding_window=sliding_window,
        max_position_embeddings=1024,
        query_pre_attn_scalar=head_dim,
        final_logit_softcapping=final_logit_softcapping,
        attn_logit_softcapping=attn_logit_softcapping,
        rope_theta=10_000.0 * 4,  # distinct global/local thetas, so a swap shows
        rope_local_base_freq=10_000.0,
        layer_types=[
            "full_attention" if (i + 1) % sliding_window_pattern == 0 else "sliding_attention" for i in range(layers)
        ],
        pad_token_id=PAD,
        eos_token_id=[EOS, EOT],
        bos_token_id=BOS,
        initializer_range=0.1,
    )
    if rope_scaling is not None:
        kw["rope_scaling"] = dict(rope_scaling)
    return kw


def randomize_(model, seed: int, norm_scale: float = 0.5, std: float = 0.1) -> None:
    """Overwrite every parameter: N(0, std) for matrices, U(-norm_scale, norm_scale) for norms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * norm_scale)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def make_tiny_gemma3(
    dir: str | Path,
    *,
    seed: int = 0,
    layers: int = 7,
    sliding_window: int = 16,
    rope_scaling: dict | None = None,
    final_logit_softcapping: float | None = None,
    attn_logit_softcapping: float | None = None,
    vocab_size: int | None = None,
    with_tokenizer: bool = True,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    extra_alphabet: str = "",
    **geometry,
) -> Path:
    """A tiny random Gemma3ForCausalLM saved with save_pretrained(safe_serialization=True).

    Layers default to 7 with every 3rd global (L L G L L G L), so both kinds appear and the
    last layer is local. `dtype` is "float32", "bfloat16" or "float16".
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(d, extra_alphabet=extra_alphabet) if with_tokenizer else TOKENIZER_VOCAB
    if vocab_size is None:
        vocab_size = (n_tok + 31) // 32 * 32 + 32  # a few unused rows, like Gemma's 262208
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} does not cover the tokenizer's {n_tok} tokens")
    cfg = Gemma3TextConfig(**text_config_kwargs(
        layers=layers, sliding_window=sliding_window, rope_scaling=rope_scaling,
        final_logit_softcapping=final_logit_softcapping, attn_logit_softcapping=attn_logit_softcapping,
        vocab_size=vocab_size, **geometry,
    ))
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    randomize_(model, seed)
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(d, safe_serialization=True, **kw)
    return d


def make_tiny_gemma3_multimodal(
    dir: str | Path, *, seed: int = 0, layers: int = 3, dtype: str = "float32", with_tokenizer: bool = True
) -> Path:
    """A tiny random Gemma3ForConditionalGeneration (tiny SigLIP tower) saved with save_pretrained."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    n_tok = write_tokenizer(d) if with_tokenizer else TOKENIZER_VOCAB
    vocab = (n_tok + 31) // 32 * 32 + 32
    tc = text_config_kwargs(layers=layers, vocab_size=vocab)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                       boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(d, safe_serialization=True)
    return d


def load_reference(d: str | Path):
    """The checkpoint as a float32 transformers model with eager attention."""
    import torch
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def raw_state_dict(d: str | Path) -> dict:
    """Every tensor in the directory's safetensors files, as stored (torch tensors, original dtype)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
