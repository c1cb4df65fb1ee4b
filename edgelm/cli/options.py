"""Options shared by several commands."""

from __future__ import annotations

import json

import click

from ..errors import BadInputError

backend_option = click.option(
    "--backend", type=click.Choice(["cpu", "numpy", "cuda", "auto"]), default="cpu", show_default=True,
    help="cpu: the native kernels; numpy: the reference; cuda: an NVIDIA GPU (the edgelm[cuda] extra); "
         "auto: cuda where a GPU is present, else cpu.")

kv_dtype_option = click.option(
    "--kv-dtype", type=click.Choice(["f16", "f32"]), default=None,
    help="KV-cache storage: f16 halves its memory and bandwidth (default on cpu and cuda), f32 (default on numpy).")

attn_precision_option = click.option(
    "--attn-precision", type=click.Choice(["auto", "f32", "bf16"]), default=None,
    help="Prefill attention's dot products: bf16 with fp32 sums on CPUs with AVX512_BF16 (faster prompts, a "
         "small quality cost; elsewhere f32), or f32. auto (default): bf16 for int4 bundles, else f32. "
         "docs/kernels.md, \"bf16 prefill attention\".")

deterministic_option = click.option(
    "--deterministic/--no-deterministic", default=None,
    help="Batch-invariant kernels: the same request always gives the same tokens, however the prompt "
         "was chunked or cached (slower decode; default: EDGELM_DETERMINISTIC, else off).")

CONSTRAINT_FLAGS = ("--json-schema", "--json-object", "--regex", "--grammar")


def constraint_options(lead: str):
    """The structured-output flags of `run` and `bench` (docs/structured-output.md); `lead`
    starts each help text ("Output" for run, "Compare unconstrained decoding with decoding of"
    for bench)."""
    def deco(f):
        for opt in reversed((
            click.option("--json-schema", "json_schema", type=click.Path(), default=None,
                         help=f"{lead} JSON that validates against the JSON Schema in this file "
                              "(docs/structured-output.md)."),
            click.option("--json-object", is_flag=True, help=f"{lead} a JSON object (any)."),
            click.option("--regex", default=None, help=f"{lead} text that fully matches this regular expression."),
            click.option("--grammar", type=click.Path(), default=None,
                         help=f"{lead} text in the language of this Lark grammar file."),
        )):
            f = opt(f)
        return f
    return deco


def constraint_spec(json_schema, json_object, regex, grammar):
    """(flag, Constraint field, value) from the constraint options, or None; at most one.
    Files are read and a schema parsed here, before any model loads."""
    given = [f for f, v in zip(CONSTRAINT_FLAGS, (json_schema, json_object or None, regex, grammar)) if v is not None]
    if len(given) > 1:
        raise BadInputError(f"give at most one of {', '.join(CONSTRAINT_FLAGS)} (got {', '.join(given)})")
    if not given:
        return None
    from .eval import read_text_file

    def read(flag, path):
        try:
            return read_text_file(path)
        except BadInputError as e:
            raise BadInputError(f"{flag} {e}") from None

    if json_schema is not None:
        text = read("--json-schema", json_schema)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"--json-schema {json_schema}: not valid JSON ({e})") from None
        return f"--json-schema {json_schema}", "json_schema", schema
    if json_object:
        return "--json-object", "json_object", True
    if regex is not None:
        return "--regex", "regex", regex
    return f"--grammar {grammar}", "lark", read("--grammar", grammar)


def build_constraint(engine, spec):
    """The Constraint of a constraint_spec() for `engine`; an invalid or unsupported grammar
    is a BadInputError that names the flag (and file) rather than the Constraint field."""
    from ..runtime.constrained import Constraint

    flag, field, value = spec
    try:
        return Constraint(engine, **{field: value})
    except BadInputError as e:
        msg = str(e)
        raise BadInputError(f"{flag}: {msg[len(field) + 2:] if msg.startswith(field + ': ') else msg}") from None
