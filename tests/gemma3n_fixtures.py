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


def tiny_text_bundle(root: Path, scheme: str, seed: int = 3) -> Path:
    """make_tiny_gemma3n under `root`, converted by edgelm at `scheme` -> the bundle path."""
    from edgelm.convert.common import convert
    from edgelm.convert.hf import load_hf_source

    out = Path(root) / f"g3n-{scheme}.edgelm"
    convert(load_hf_source(make_tiny_gemma3n(Path(root) / "hf", seed=seed)), out, scheme=scheme, progress=False)
    return out


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


# ----------------------------------------------------------------------------- with real towers

MM_TOKENS = ("<start_of_image>", "<start_of_audio>")  # text-range markers, as Gemma 3n's boi/boa
MM_VOCAB = 8  # hard tokens per modality (Gemma 3n: 128)

# A Gemma 3n-style chat template reading typed content: text items trimmed, an image item as
# the image placeholder token, an audio item as the audio one (the processor expands both).
MM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image_soft_token>' }}"
    "{% elif item['type'] == 'audio' %}{{ '<audio_soft_token>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def write_mm_tokenizer(d: Path) -> dict:
    """The tiny BPE tokenizer plus Gemma 3n's multimodal tokens laid out as in Gemma 3n: the
    begin markers in the text range, then the vision range (<end_of_image> at its offset,
    <image_soft_token> next) and the audio range (<end_of_audio>, <audio_soft_token>), each
    MM_VOCAB ids long, padded with unused tokens. Returns the ids."""
    import json

    from tokenizers import AddedToken

    tok = fx.build_tokenizer(fx.TOKENIZER_VOCAB, extra_alphabet="\n")
    base = tok.get_vocab_size()
    names = list(MM_TOKENS)
    vision = base + len(names)
    names += ["<end_of_image>", "<image_soft_token>"] + [f"<unused_v{i}>" for i in range(MM_VOCAB - 2)]
    audio = base + len(names)
    names += ["<end_of_audio>", "<audio_soft_token>"] + [f"<unused_a{i}>" for i in range(MM_VOCAB - 2)]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    for i, n in enumerate(names):
        assert tok.token_to_id(n) == base + i, n
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    ids = {"boi": base, "boa": base + 1, "eoi": vision, "image": vision + 1, "eoa": audio, "audio": audio + 1,
           "vision_offset": vision, "audio_offset": audio, "vocab": audio + MM_VOCAB}
    extra = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "extra_special_tokens": extra,
        "model_max_length": 2048,
        "chat_template": MM_CHAT_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")}
    (d / "special_tokens_map.json").write_text(json.dumps(smap, indent=2), encoding="utf-8")
    return ids


# the image size of the tiny checkpoints' processor: MobileNet-V5 makes 16 x 16 tokens from
# any multiple of 32 (Gemma 3n's is 768; 256 keeps the torch reference fast)
MM_IMAGE_SIZE = 256


def mm_configs(ids: dict, *, vision: bool = True, audio: bool = True, channel_multiplier: float = 0.05, **kw):
    """transformers configs (text, vision, audio, whole) of a tiny Gemma 3n with towers."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig

    tkw = text_config_kwargs(**{"vocab_size": ids["vocab"], "vocab_size_per_layer_input": ids["vision_offset"], **kw})
    tkw["max_position_embeddings"] = 2048
    tc = Gemma3nTextConfig(**tkw)
    vc = Gemma3nVisionConfig(model_args={"channel_multiplier": channel_multiplier}, vocab_offset=ids["vision_offset"],
                             vocab_size=MM_VOCAB)
    ac = Gemma3nAudioConfig(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=2,
                            sscp_conv_channel_size=[8, 4], vocab_offset=ids["audio_offset"], vocab_size=MM_VOCAB)
    cfg = Gemma3nConfig(text_config=tc, vision_config=vc, audio_config=ac, image_token_id=ids["image"],
                        boi_token_id=ids["boi"], eoi_token_id=ids["eoi"], audio_token_id=ids["audio"],
                        boa_token_id=ids["boa"], eoa_token_id=ids["eoa"], initializer_range=0.1)
    return cfg


def randomize_towers_(model, seed: int) -> None:
    """Text decoder and embedders as randomize_ does; in the towers (deep, so N(0, 0.1)
    matrices would explode) only the 1-D parameters are redrawn (norm scales, layer scales,
    biases: uniform in [0.5, 1.5]), so no branch is switched off by its initial value."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            tower = ".vision_tower." in f".{name}" or ".audio_tower." in f".{name}"
            if not tower:
                if p.ndim == 1:
                    mag = torch.rand(p.shape, generator=g) + 0.5
                    sign = torch.where(torch.rand(p.shape, generator=g) < 0.2, -1.0, 1.0)
                    p.copy_(mag * sign)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def make_tiny_gemma3n_mm(dir: str | Path, *, seed: int = 0, **kw) -> Path:
    """A tiny random Gemma3nForConditionalGeneration with both real towers (MobileNet-V5 with
    narrow channels, a 2-layer conformer), saved with save_pretrained, plus the multimodal
    tokenizer and a preprocessor_config.json (images at MM_IMAGE_SIZE px). Needs timm
    (tests/timm_support.need_timm())."""
    import json

    import torch
    from transformers import Gemma3nForConditionalGeneration

    d = Path(dir)
    ids = write_mm_tokenizer(d)
    cfg = mm_configs(ids, **kw)
    torch.manual_seed(seed)
    model = Gemma3nForConditionalGeneration(cfg).eval()
    randomize_towers_(model, seed)
    model.save_pretrained(d, safe_serialization=True)
    pre = {
        "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "padding_value": 0.0, "padding_side": "right", "return_attention_mask": True,
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "size": {"height": MM_IMAGE_SIZE, "width": MM_IMAGE_SIZE}, "do_convert_rgb": True,
    }
    (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (d / "mm_ids.json").write_text(json.dumps(ids))
    return d


_mm_lock = __import__("threading").Lock()
_mm_cache: dict = {}


def tiny_mm_bundle(tower_scheme: str = "fp32"):
    """(bundle path, checkpoint dir) of the tiny Gemma 3n with both towers, converted fp32
    (towers at `tower_scheme`), built once per process in a temporary directory. Needs
    timm (tests/timm_support.need_timm())."""
    import atexit
    import shutil
    import tempfile

    with _mm_lock:
        if tower_scheme in _mm_cache:
            return _mm_cache[tower_scheme]
        from edgelm.convert.common import convert
        from edgelm.convert.hf import load_hf_source

        root = _mm_cache.get("root")
        if root is None:
            root = _mm_cache["root"] = Path(tempfile.mkdtemp(prefix="edgelm-mm-"))
            atexit.register(shutil.rmtree, root, True)
        d = root / "ckpt"
        if not (d / "config.json").exists():
            make_tiny_gemma3n_mm(d, seed=5)
        out = root / f"mm-{tower_scheme}.edgelm"
        convert(load_hf_source(d), out, scheme="fp32", tower_scheme=tower_scheme, progress=False)
        _mm_cache[tower_scheme] = (out, d)
        return out, d
