"""A tiny random Gemma 3 bundle shared by the chat/serving tests (built once per process).

Made with tests/hf_fixtures.py (transformers, random weights) and converted with edgelm's
HF importer. The checkpoint's own test template is dropped, so the bundle carries edgelm's
default Gemma chat template (system prompt folded into the first user turn), as real Gemma
bundles do. 3 layers (local, local, global), a sliding window of 8.
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hf_fixtures as fx  # noqa: E402

_lock = threading.Lock()
_cache: dict[str, Path] = {}
_root: Path | None = None


# An "instruction-tuned" template that declares tools itself, as Hugging Face templates of
# tool-calling models do (it reads `tools`, assistant `tool_calls` and `tool` messages).
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<start_of_turn>system\nFunctions:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}Call one as ```tool_call\n{\"name\": ..., \"arguments\": {...}}\n```<end_of_turn>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<start_of_turn>model\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}```tool_call\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n```{% endfor %}<end_of_turn>\n"
    "{% else %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def tiny_bundle(name: str = "chat", seed: int = 1) -> Path:
    """name "chat": edgelm's Gemma template; "newline": the same with a newline piece in the
    vocabulary (the tool-call format needs one); "tools": a newline piece and TOOLS_TEMPLATE."""
    global _root
    with _lock:
        if name in _cache:
            return _cache[name]
        if _root is None:
            _root = Path(tempfile.mkdtemp(prefix="edgelm-tiny-"))
            atexit.register(shutil.rmtree, _root, True)
        from edgelm.convert import convert, load_source

        tools = name == "tools"
        d = fx.make_tiny_gemma3(_root / f"{name}-hf", seed=seed, layers=3, sliding_window=8,
                                extra_alphabet="\n" if name in ("tools", "newline") else "")
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        if tools:
            cfg["chat_template"] = TOOLS_TEMPLATE
        cfg_path.write_text(json.dumps(cfg))
        out = _root / f"{name}.edgelm"
        convert(load_source(d), out, scheme="fp32", progress=False)
        _cache[name] = out
        return out
