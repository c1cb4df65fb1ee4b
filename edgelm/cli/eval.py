"""`edgelm eval ppl`: perplexity (and KL against a base model) over a text file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import backend_option, kv_dtype_option

from ..errors import BadInputError


def read_text_file(path: str) -> str:
    """A UTF-8 text file's content, or a BadInputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{path}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@click.group(name="eval")
def eval_group():
    """Measure model quality."""


@eval_group.command()
@click.option("--model", "-m", required=True, type=click.Path(), help="The .edgelm bundle to score.")
@click.option("--text", required=True, type=click.Path(dir_okay=False), help="UTF-8 text file (e.g. wikitext-2 test).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--max-chunks", type=int, default=None, help="Score at most this many chunks.")
@click.option("--kl-base", type=click.Path(dir_okay=False), default=None,
              help="A reference bundle: also report mean KL(base || model) and top-1 agreement.")
@click.option("--threads", "-t", type=int, default=None)
@backend_option
@kv_dtype_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ppl(model, text, ctx, max_chunks, kl_base, threads, backend, kv_dtype, as_json):
    """Perplexity of MODEL over TEXT, computed the way llama-perplexity does (docs/quality.md)."""
    from ..eval.ppl import perplexity
    from ..runtime.engine import Engine

    content = read_text_file(text)
    eng = Engine(model, backend=backend, threads=threads, max_tokens=ctx, prefill_chunk=ctx, kv_dtype=kv_dtype)
    base = (Engine(kl_base, backend=backend, threads=threads, max_tokens=ctx, prefill_chunk=ctx, kv_dtype=kv_dtype)
            if kl_base else None)
    r = perplexity(eng, content, ctx=ctx, max_chunks=max_chunks, kl_base=base, progress=not as_json)
    if as_json:
        click.echo(json.dumps({"model": model, "text": text, "kl_base": kl_base, **r.to_dict()}, indent=2))
        return
    click.echo(f"model    {model}")
    click.echo(f"text     {text}: {r.chunks} chunks x {r.ctx} tokens, {r.tokens_scored} scored, {r.seconds:.1f} s")
    click.echo(f"PPL      {r.ppl:.4f} +/- {r.ppl_stderr:.4f}")
    if r.kl_mean is not None:
        click.echo(f"KL       {r.kl_mean:.6f} +/- {r.kl_stderr:.6f}  (base {kl_base})")
        click.echo(f"top-1    {100 * r.top1_agree:.2f}%")
