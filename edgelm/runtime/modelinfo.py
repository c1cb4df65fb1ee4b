"""What a bundle's header says about its model, without loading it (no Engine needed).

`is_instruction_tuned(meta)` is the one place that decides whether a bundle holds an
instruction-tuned (chat) model or a base (pre-trained) one, which only continues text.
`meta` is a bundle header (`Engine(...).bundle.header`, or what `edgelm info` prints).
"""

from __future__ import annotations

import re
from pathlib import PurePath

BASE_MODEL_NOTICE = ("This is a base model: it continues text and is not tuned for chat, so its replies may "
                     "ramble. Use an instruction-tuned (-it) model to chat.")

# Name parts that mark a tuned checkpoint (gemma-3-1b-it, "Gemma 3 270m It", Llama-2-7b-chat, ...)
_TUNED = {"it", "instruct", "instruction", "chat", "sft", "dpo", "rlhf"}
# ... and a pre-trained one (gemma-3-4b-pt, "... base").
_BASE = {"pt", "base", "pretrained"}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def is_instruction_tuned(meta: dict) -> bool | None:
    """True for an instruction-tuned model, False for a base model, None when the header does not say.

    Decided, in order, by:
    1. an explicit boolean `instruction_tuned` field in the header, if a converter wrote one;
    2. the source's names (`source.name`, the file name of `source.path`, `source.finetune`):
       a word such as "it", "instruct" or "chat" means tuned; "pt", "base" or "pretrained" means base;
    3. Google's naming: a Gemma checkpoint name with neither ("gemma-3-270m", GGUF "Gemma 3 270m",
       the built-in default model) is the base release, since the tuned ones end in "-it".
    The chat template is no evidence: base Gemma checkpoints ship the same template as tuned ones,
    and edgelm stores its default template for sources without one.
    """
    if not isinstance(meta, dict):
        return None
    explicit = meta.get("instruction_tuned")
    if isinstance(explicit, bool):
        return explicit
    src = meta.get("source")
    if not isinstance(src, dict):
        return None
    names = []
    for key in ("finetune", "name"):
        if isinstance(src.get(key), str):
            names.append(src[key])
    if isinstance(src.get("path"), str) and src["path"]:
        names.append(PurePath(src["path"]).name)
    words = [_words(n) for n in names]
    if any(_TUNED.intersection(w) for w in words):
        return True
    if any(_BASE.intersection(w) for w in words):
        return False
    if any(w and w[0].startswith("gemma") for w in words):
        return False
    return None
