"""The `edgelm` command. Errors reach the user as one line and an exit code."""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import BadInputError, EdgelmError
from .options import (backend_option, build_constraint, constraint_options, constraint_spec, deterministic_option,
                      kv_dtype_option, attn_precision_option)

EXIT_INTERNAL = 70


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelm")
def cli():
    """edgelm: run Gemma 3 models on-device. Convert, inspect and generate."""


# ----------------------------------------------------------------------------- run

@cli.command()
@click.argument("prompt", required=False)
@click.option("--file", "-f", "prompt_file", type=click.Path(), default=None,
              help="Read the prompt from a UTF-8 text file (or PROMPT '-' for standard input).")
@click.option("--model", "-m", type=click.Path(), default=None,
              help="A .edgelm bundle (default: Gemma 3 270M, prepared on first use).")
@click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=None, help="0 = greedy (default: the bundle's).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (llama.cpp style).")
@click.option("--presence-penalty", type=float, default=None, help="In [-2, 2], OpenAI style.")
@click.option("--frequency-penalty", type=float, default=None, help="In [-2, 2], OpenAI style.")
@click.option("--stop", "stop", multiple=True, help="Stop at this string (not printed); repeat for several.")
@constraint_options("Output")
@click.option("--threads", "-t", type=int, default=None, help="Kernel threads (default: physical cores).")
@click.option("--max-tokens", type=int, default=None, help="KV-cache capacity (default: 4096, or the model's context if shorter).")
@backend_option
@kv_dtype_option
@attn_precision_option
@deterministic_option
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Gemma 3n: an image (JPEG, PNG, WebP, ...) placed before the prompt; repeat for several.")
@click.option("--audio", "audios", multiple=True, type=click.Path(dir_okay=False),
              help="Gemma 3n: an audio file (WAV, FLAC, OGG, MP3) placed before the prompt; repeat for several.")
@click.option("--quiet", "-q", is_flag=True, help="Do not print stats to stderr.")
def run(prompt, prompt_file, model, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty,
        presence_penalty, frequency_penalty, stop, json_schema, json_object, regex, grammar, threads, max_tokens,
        backend, kv_dtype, attn_precision, deterministic, images, audios, quiet):
    """Generate a continuation of PROMPT, streamed to stdout. PROMPT '-' reads standard input;
    --file reads a file. --image/--audio put media before the prompt (a bundle with Gemma 3n's
    towers), each expanded as Gemma 3n's processor does."""
    from ..runtime.content import Audio, Image, Text
    from ..runtime.engine import Engine
    from ..runtime.session import GenerationStats

    prompt = _read_prompt(prompt, prompt_file)
    if images or audios:
        prompt = [*(Image(f) for f in images), *(Audio(f) for f in audios), Text(prompt)]
    spec = constraint_spec(json_schema, json_object, regex, grammar)  # file errors before the model loads
    eng = Engine(model, backend=backend, threads=threads, max_tokens=max_tokens, kv_dtype=kv_dtype,
                 deterministic=deterministic, attn_precision=attn_precision)
    sampler = eng.default_sampler.override(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                           repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                           frequency_penalty=frequency_penalty)
    constraint = None if spec is None else build_constraint(eng, spec)
    session = eng.create_session(sampler)
    out = sys.stdout
    stats = None
    for piece in session.generate(prompt, max_new_tokens=max_new_tokens, stop=list(stop) or None,
                                  constraint=constraint):
        if isinstance(piece, GenerationStats):
            stats = piece
            break
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    if stats and not quiet:
        click.echo(
            f"[{stats.prompt_tokens} prompt tokens, {stats.generated_tokens} generated; "
            f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s, "
            f"TTFT {stats.ttft_seconds:.3f} s, init {eng.init_seconds:.3f} s, {eng.backend}/{getattr(eng.ops, 'isa', '-')}]",
            err=True,
        )


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt from the argument, standard input ('-') or a file (--file); exactly one."""
    if prompt_file is not None and prompt is not None:
        raise BadInputError("give the prompt either as an argument or with --file, not both")
    if prompt_file is not None:
        from .eval import read_text_file

        return read_text_file(prompt_file)
    if prompt is None:
        raise BadInputError("no prompt: give PROMPT, '-' to read standard input, or --file FILE")
    if prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInputError(f"standard input: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return prompt


# ----------------------------------------------------------------------------- convert

@cli.command()
@click.argument("src", type=click.Path())
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .edgelm file to write.")
@click.option("--scheme", "-s", default="int8-b32", show_default=True,
              help="Scheme for linear layers: fp32, fp16, int8, int8-b32, int4-b32, int4-b128.")
@click.option("--embed-scheme", default=None, help="Scheme for the embedding / tied output head (default: --scheme).")
@click.option("--requantize", is_flag=True, help="Requantize GGUF Q4_0/Q8_0 blocks even where they map losslessly.")
@click.option("--ple-scheme", default=None,
              help="Scheme for Gemma 3n's per-layer embedding table (default: --embed-scheme).")
@click.option("--matformer", default=None, metavar="SPEC",
              help="Gemma 3n: extract a MatFormer slice: e2b, or LAYERS:FFN_WIDTHS (see docs/gemma3n.md).")
@click.option("--imatrix", "imatrix_path", default=None, type=click.Path(dir_okay=False),
              help="Column importance from `edgelm imatrix`: the int4 scale search weighs its error by it.")
@click.option("--tower-scheme", default="fp16", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Gemma 3n: scheme of the image and audio towers' weight matrices.")
@click.option("--no-vision", is_flag=True, help="Gemma 3n: drop the image tower (no image input).")
@click.option("--no-audio", is_flag=True, help="Gemma 3n: drop the audio tower (no audio input).")
@click.option("--quiet", "-q", is_flag=True)
def convert(src, output, scheme, embed_scheme, requantize, ple_scheme, matformer, imatrix_path, tower_scheme,
            no_vision, no_audio, quiet):
    """Convert a GGUF file or Hugging Face checkpoint dir SRC into a bundle."""
    from pathlib import Path

    from ..convert import convert as do_convert
    from ..convert import load_source

    importance = imeta = None
    if imatrix_path is not None:
        from ..runtime import imatrix

        importance, imeta = imatrix.load(imatrix_path)
        imeta = {"file": Path(imatrix_path).name, **imeta}
    keep = tuple(k for k, drop in (("vision", no_vision), ("audio", no_audio)) if not drop)
    source = load_source(src, keep=keep)  # convert() refuses an output that is one of source.input_files
    if imatrix_path is not None:
        source.input_files.append(Path(imatrix_path))
    if matformer is not None:
        from ..convert.matformer import slice_source

        source = slice_source(source, matformer)
    summary = do_convert(source, output, scheme=scheme, embed_scheme=embed_scheme, requantize=requantize,
                         progress=not quiet, ple_scheme=ple_scheme, importance=importance, importance_meta=imeta,
                         tower_scheme=tower_scheme)
    if quiet:
        return
    click.echo(f"{'scheme':<10} {'tensors':>7} {'weights':>14} {'bytes':>12}")
    for name, count, weights, nbytes in summary["by_scheme"]:
        click.echo(f"{name:<10} {count:>7} {weights:>14,} {_fmt_bytes(nbytes):>12}")
    for note in source.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {summary['path']}: {_fmt_bytes(summary['size'])}, {summary['bits_per_weight']:.2f} bits/weight, "
               f"{summary['seconds']:.1f} s")


# ----------------------------------------------------------------------------- imatrix

@cli.command()
@click.option("--model", "-m", required=True, type=click.Path(),
              help="A bundle of the model (any scheme; a more precise one gives cleaner statistics).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Calibration text (default: text the model generates itself from BOS, seeded).")
@click.option("--tokens", type=int, default=4096, show_default=True, help="Calibration tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the self-generated text.")
@click.option("--threads", "-t", type=int, default=None)
@backend_option
@click.option("--quiet", "-q", is_flag=True)
def imatrix(model, output, text, tokens, seed, threads, backend, quiet):
    """Collect per-column activation importance for `convert --imatrix` (docs/quality.md)."""
    import time
    from pathlib import Path

    from tqdm import tqdm

    from ..runtime import imatrix as im
    from ..runtime.engine import Engine

    if tokens < 16:
        raise BadInputError(f"--tokens must be at least 16, got {tokens}")
    out_dir = Path(output).resolve().parent
    if not out_dir.is_dir():
        raise BadInputError(f"{output}: the directory {out_dir} does not exist")
    eng = Engine(model, backend=backend, threads=threads, max_tokens=512, prefill_chunk=512)
    t0 = time.perf_counter()
    if text is not None:
        from .eval import read_text_file

        seqs = im.text_calibration(eng, read_text_file(text), tokens)
        source = {"text": Path(text).name}
    else:
        with tqdm(total=tokens, desc="generating calibration text", unit="tok", disable=quiet, leave=False) as bar:
            seqs = im.self_generated_calibration(eng, tokens, seed=seed, progress=bar.update)
        source = {"self_generated": True, "seed": seed}
    n = sum(len(s) for s in seqs)
    with tqdm(total=n, desc="collecting importance", unit="tok", disable=quiet, leave=False) as bar:
        data = im.collect(eng, seqs, progress=bar.update)
    meta = {"model": Path(model).name, "tokens": n, **source}
    im.save(output, data, meta)
    if not quiet:
        click.echo(f"wrote {output}: {len(data)} tensors, {n} calibration tokens, {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------- inspect

def _inputs_line(b, rows) -> str:
    """What a bundle takes: text, plus each kept tower with its token count and weight size."""
    parts = ["text"]
    for kind, word, prefixes in (("vision", "image", ("v.", "mm.v.")), ("audio", "audio", ("a.", "mm.a."))):
        m = b.config.get(kind) if isinstance(b.config, dict) else None
        if not isinstance(m, dict):
            continue
        mine = [r for r in rows if r[0].startswith(prefixes)]
        per = "image" if kind == "vision" else "clip of <= 30 s"
        pre = m.get("preprocess") or {}
        size = pre.get("size") if isinstance(pre.get("size"), dict) else None
        px = f", {size.get('height')}x{size.get('width')} px" if size else ""
        parts.append(f"{word} ({m.get('soft_tokens')} tokens per {per}{px}; tower {len(mine)} tensors, "
                     f"{_fmt_bytes(sum(r[4] for r in mine))})")
    return " + ".join(parts)


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the header and tensor table as JSON.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="Print the tensor table.")
def inspect(file, as_json, tensors):
    """Print a bundle's header, tensor table, schemes, size and bits per weight."""
    from ..format.bundle import Bundle
    from ..quant.schemes import SCHEMES

    with Bundle(file) as b:
        rows = []
        for name in b.tensor_names():
            t = b.tensor_info(name)
            n = 1
            for d in t["shape"]:
                n *= d
            nbytes = sum(p["size"] for p in t["parts"].values())
            rows.append((name, t["scheme"], t["shape"], n, nbytes))
        by_scheme: dict[str, list[int]] = {}
        for _, s, _, n, nb in rows:
            a = by_scheme.setdefault(s, [0, 0, 0])
            a[0] += 1
            a[1] += n
            a[2] += nb
        total_w = sum(r[3] for r in rows)
        total_b = sum(r[4] for r in rows)
        if as_json:
            click.echo(json.dumps({
                "path": str(b.path), "format_version": b.version, "file_size": b.file_size,
                "header": b.meta, "tensors": [{"name": r[0], "scheme": r[1], "shape": r[2], "bytes": r[4]} for r in rows],
                "schemes": {k: {"tensors": v[0], "weights": v[1], "bytes": v[2]} for k, v in by_scheme.items()},
                "weights": total_w, "bits_per_weight": 8 * total_b / max(total_w, 1),
            }, indent=2))
            return
        meta = b.meta
        click.echo(f"file        {b.path} ({_fmt_bytes(b.file_size)}, format v{b.version})")
        click.echo(f"arch        {b.arch}")
        towers = ("vision", "audio")
        click.echo("config      " + ", ".join(f"{k}={v}" for k, v in b.config.items()
                                              if k != "layer_types" and k not in towers))
        click.echo("inputs      " + _inputs_line(b, rows))
        lt = b.config.get("layer_types")
        if lt:
            click.echo("layers      " + "".join("G" if x == "global" else "L" for x in lt) + "  (L local, G global)")
        tok = meta.get("tokenizer", {})
        click.echo(f"tokenizer   {tok.get('kind')} ({_fmt_bytes(b.blobs_meta.get(tok.get('blob', 'tokenizer'), {}).get('size', 0))})")
        click.echo(f"special     {json.dumps(meta.get('special_tokens'))}")
        tmpl = meta.get("chat_template") or ""
        click.echo(f"template    {meta.get('chat_template_origin', 'source')}, {len(tmpl)} chars")
        click.echo(f"sampler     {json.dumps(meta.get('sampler'))}")
        click.echo(f"quantized   {json.dumps(meta.get('quantization'))}")
        click.echo(f"source      {json.dumps(meta.get('source'))}")
        if tensors:
            click.echo("")
            w = max(len(r[0]) for r in rows) if rows else 4
            click.echo(f"{'tensor':<{w}}  {'scheme':<9} {'shape':<16} {'bytes':>10}")
            for name, s, shape, n, nb in rows:
                click.echo(f"{name:<{w}}  {s:<9} {'x'.join(map(str, shape)):<16} {_fmt_bytes(nb):>10}")
        click.echo("")
        click.echo(f"{'scheme':<10} {'tensors':>7} {'weights':>14} {'bytes':>12} {'bits/w':>7}")
        for s, (c, n, nb) in sorted(by_scheme.items(), key=lambda kv: -kv[1][2]):
            click.echo(f"{s:<10} {c:>7} {n:>14,} {_fmt_bytes(nb):>12} {8 * nb / n:>7.2f}")
        click.echo(f"total: {total_w:,} weights, {_fmt_bytes(total_b)} of tensors, "
                   f"{8 * total_b / max(total_w, 1):.2f} bits/weight; file {_fmt_bytes(b.file_size)}")
        assert set(by_scheme) <= set(SCHEMES)


from .bench import bench  # noqa: E402
from .eval import eval_group  # noqa: E402

cli.add_command(eval_group)
cli.add_command(bench)


# ----------------------------------------------------------------------------- entry

def entry(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="edgelm", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("edgelm: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except EdgelmError as e:
        click.echo(f"edgelm: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("\nedgelm: interrupted", err=True)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except MemoryError:
        click.echo("edgelm: error: out of memory", err=True)
        return EXIT_INTERNAL
    except Exception as e:  # never a raw traceback for users
        if os.environ.get("EDGELM_DEBUG"):
            raise
        click.echo(f"edgelm: internal error: {type(e).__name__}: {e} (set EDGELM_DEBUG=1 for a traceback)", err=True)
        return EXIT_INTERNAL


def main() -> None:
    sys.exit(entry())


from .chat import chat  # noqa: E402
from .serve import serve  # noqa: E402

cli.add_command(chat)
cli.add_command(serve)
