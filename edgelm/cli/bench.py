"""`edgelm bench`: prefill/decode tok/s, TTFT, init, peak RSS, size and GB/s for a bundle."""

from __future__ import annotations

import json

import click

from ..errors import BadInputError
from .options import (CONSTRAINT_FLAGS, attn_precision_option, backend_option, build_constraint, constraint_options,
                      constraint_spec)

SYNTHETIC = ("gemma3-270m", "gemma3-1b", "gemma3-4b", "gemma3n-e2b", "gemma3n-e4b")


def _synthetic_in_child(name, scheme, embed_scheme, quiet, tower_scheme="int8"):
    """Write the synthetic bundle in a child process, so the conversion's memory does not
    count in this process's peak RSS. tower_scheme: the towers' scheme of a geometry that has
    them (Gemma 3n), "none" for the text-only bundle."""
    import subprocess
    import sys
    from pathlib import Path

    from ..convert.common import LINEAR_SCHEMES

    for s in (scheme, embed_scheme):
        if s not in LINEAR_SCHEMES:
            raise BadInputError(f"unknown scheme {s!r}; choose one of {', '.join(LINEAR_SCHEMES)}")
    code = ("import sys; from edgelm.runtime.defaults import synthetic_bundle; "
            "print(synthetic_bundle(sys.argv[1], sys.argv[2], sys.argv[3], quiet=sys.argv[4] == '1', "
            "tower_scheme=sys.argv[5]))")
    p = subprocess.run([sys.executable, "-c", code, name, scheme, embed_scheme, "1" if quiet else "0", tower_scheme],
                       stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise BadInputError(f"could not write the synthetic {name} bundle (exit {p.returncode})")
    return Path(p.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--model", "-m", type=click.Path(), default=None,
              help="A .edgelm bundle (default: the default model).")
@click.option("--synthetic", type=click.Choice(SYNTHETIC), default=None,
              help="Benchmark random weights of a real geometry instead (labelled SYNTHETIC).")
@click.option("--scheme", default="int4-b32", show_default=True, help="With --synthetic: linear scheme.")
@click.option("--embed-scheme", default="int8", show_default=True, help="With --synthetic: embedding/head scheme.")
@click.option("--tower-scheme", type=click.Choice(["int8", "fp16", "fp32", "none"]), default="int8", show_default=True,
              help="With --synthetic gemma3n-*: scheme of the image/audio towers' products (the bundle keeps both "
                   "towers; the table gains their columns); none: a text-only bundle.")
@click.option("-p", "prompt_tokens", type=int, default=512, show_default=True, help="Prompt tokens.")
@click.option("-n", "gen_tokens", type=int, default=128, show_default=True, help="Decoded tokens.")
@click.option("--threads", "-t", type=int, default=None, help="Kernel threads (default: physical cores).")
@click.option("--repeat", "-r", type=int, default=3, show_default=True, help="Measured runs (after one warm-up).")
@click.option("--max-tokens", type=int, default=1280, show_default=True, help="KV-cache capacity.")
@backend_option
@click.option("--kv-dtype", type=click.Choice(["f16", "f32"]), default=None,
              help="KV-cache storage (default: f16 on cpu, f32 on numpy).")
@attn_precision_option
@click.option("--prefill-chunk", type=int, default=None, help="Prompt tokens per forward pass (default 128, the engine's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--no-probe", is_flag=True,
              help="Skip the bandwidth probe (a child process with a 512 MiB buffer: a parent's "
                   "wait4 ru_maxrss would count it).")
@constraint_options("Compare unconstrained decoding with decoding of")
@click.option("--temperature", type=float, default=None,
              help="With a constraint flag: sampling temperature of both runs of a pair (default 0, greedy).")
@click.option("--prompt", "prompt_text", default=None,
              help="With a constraint flag: the prompt text (default: a chat turn asking for what the "
                   "grammar allows).")
@click.pass_context
def bench(ctx, model, synthetic, scheme, embed_scheme, tower_scheme, prompt_tokens, gen_tokens, threads, repeat,
          max_tokens, backend, kv_dtype, attn_precision, prefill_chunk, as_json, no_probe, json_schema, json_object, regex, grammar,
          temperature, prompt_text):
    """Benchmark a bundle with the seed's columns (docs/benchmarks.md). With --json-schema,
    --json-object, --regex or --grammar: decode tok/s under that constraint against
    unconstrained decoding of the same prompt, alternating in one process
    (docs/structured-output.md, "Speed")."""
    from ..bench import bench as run_bench
    from ..bench import format_table

    if model and synthetic:
        raise BadInputError("give either --model or --synthetic, not both")
    spec = constraint_spec(json_schema, json_object, regex, grammar)  # file errors before the model loads
    if spec is None:
        for name, v in (("--temperature", temperature), ("--prompt", prompt_text)):
            if v is not None:
                raise BadInputError(f"{name} applies only with one of {', '.join(CONSTRAINT_FLAGS)}")
    elif ctx.get_parameter_source("prompt_tokens") is not click.core.ParameterSource.DEFAULT:
        raise BadInputError("-p does not apply with a constraint flag: its prompt is text (--prompt)")
    if synthetic:
        model = _synthetic_in_child(synthetic, scheme, embed_scheme, as_json, tower_scheme)
    elif model is None:
        from ..runtime.defaults import ensure_default_model

        model = ensure_default_model(quiet=as_json)
    if spec is not None:
        from ..bench_constrained import bench_constrained, format_constrained_table

        flag, field, value = spec
        res = bench_constrained(model, lambda eng: build_constraint(eng, spec), field, value, flag, gen_tokens,
                                threads, repeat, max_tokens, backend, kv_dtype, prefill_chunk, temperature or 0.0,
                                prompt_text, synthetic, progress=not as_json)
        click.echo(json.dumps(res, indent=2) if as_json else format_constrained_table(res))
        return
    res = run_bench(model, prompt_tokens, gen_tokens, threads, repeat, max_tokens, backend, synthetic,
                    progress=not as_json, probe=not no_probe, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                    attn_precision=attn_precision)
    click.echo(json.dumps(res, indent=2) if as_json else format_table(res))
