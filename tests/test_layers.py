"""Imports point one way (docs/architecture.md): cli/server -> runtime -> models -> backends
-> quant, with format, tokenizer and convert beside the stack. A module that imports a layer
above its own fails here."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edgelm"

# what each subpackage may import (besides itself and the top-level helper modules)
ALLOWED = {
    "quant": set(),
    "format": {"quant"},
    "tokenizer": set(),
    "backends": {"quant"},
    "multimodal": set(),  # input front ends (audio, images): numpy only
    "models": {"backends", "quant"},
    "convert": {"multimodal", "models", "quant", "format", "tokenizer"},  # (preprocessor settings checked)
    "runtime": {"multimodal", "models", "backends", "quant", "format", "tokenizer", "convert"},
    "eval": {"multimodal", "runtime", "models", "backends", "quant", "format", "tokenizer", "convert"},
    "server": {"multimodal", "runtime", "eval", "models", "backends", "quant", "format", "tokenizer", "convert"},
    "cli": {"multimodal", "runtime", "eval", "models", "backends", "quant", "format", "tokenizer", "convert", "server"},
}
TOP_LEVEL = {p.stem for p in PKG.glob("*.py")}  # errors, bench, ... : shared helpers


def _imports(path: Path):
    rel = path.relative_to(PKG).parts
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(rel[:-1])[: len(rel) - node.level] if node.level > 1 else list(rel[:-1])
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:
                    target = base + [a.name for a in node.names][:1]
            elif node.module and node.module.startswith("edgelm."):
                target = node.module.split(".")[1:]
            else:
                continue
            yield node.lineno, target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgelm."):
                    yield node.lineno, a.name.split(".")[1:]


def test_imports_point_down_the_stack():
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PKG / layer).rglob("*.py")):
            for line, target in _imports(path):
                if not target:
                    continue
                top = target[0]
                if top == layer or top in TOP_LEVEL or top in ("_native", "web"):
                    continue
                if top not in allowed:
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports edgelm.{'.'.join(target)}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_subpackage_has_a_rule():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"_native"}
    assert subs <= set(ALLOWED), subs - set(ALLOWED)
