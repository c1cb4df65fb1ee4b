"""`edgelm chat`: an interactive terminal chat with streaming output, line editing and
history (prompt_toolkit), Ctrl-C to stop a reply, and /reset, /exit."""

from __future__ import annotations

import queue
import signal
import sys
import threading

import click

from .options import attn_precision_option, backend_option, deterministic_option, kv_dtype_option

HELP = ("commands: /image FILE, /audio FILE (attach to your next message; Gemma 3n bundles with towers), "
        "/reset (new conversation), /exit or Ctrl-D (quit), /help; Ctrl-C stops a reply")


def _line_reader(use_prompt_toolkit: bool):
    """A function prompt -> line (raises EOFError at end of input, KeyboardInterrupt on Ctrl-C)."""
    if use_prompt_toolkit:
        try:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory

            session = PromptSession(history=InMemoryHistory())
            return lambda prompt: session.prompt(prompt)
        except Exception:  # no usable terminal: plain input() below
            pass
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return input


def _attach(eng, pending: list, cmd: str, path: str) -> None:
    """/image FILE, /audio FILE: check the file and the bundle now, encode when sent."""
    import os

    from ..runtime import media
    from ..runtime.content import Audio, Image

    kind = "vision" if cmd == "/image" else "audio"
    what = cmd[1:]
    if not path:
        click.echo(f"usage: {cmd} FILE", err=True)
        return
    if media.modality(eng, kind) is None:
        click.echo(f"error: this bundle ({eng.path.name}) has no {what} encoder", err=True)
        return
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        click.echo(f"error: {path}: no such file", err=True)
        return
    pending.append(Image(path) if kind == "vision" else Audio(path))
    click.echo(f"[{what} {os.path.basename(path)} attached to your next message]", err=True)


def _reply(conv, text, out, quiet: bool) -> None:
    """Stream one reply; Ctrl-C cancels it (the conversation keeps the partial reply).

    The reply is generated in a worker thread. While it runs, SIGINT only sets the cancel
    event, so a Ctrl-C landing anywhere (even mid-write) stops the reply, never the chat."""
    from ..errors import EdgelmError

    cancel = threading.Event()
    events: queue.Queue = queue.Queue()

    def work():
        try:
            for piece in conv.stream(text, cancel=cancel):
                events.put(("piece", piece))
            events.put(("done", conv.last_stats))
        except EdgelmError as e:
            events.put(("error", f"edgelm: error: {e}"))
        except Exception as e:  # never a traceback in the chat
            events.put(("error", f"edgelm: internal error: {type(e).__name__}: {e}"))

    main = threading.current_thread() is threading.main_thread()
    old_handler = signal.getsignal(signal.SIGINT) if main else None
    if main:
        signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    worker = threading.Thread(target=work, name="edgelm-chat", daemon=True)
    try:
        worker.start()
        wrote = False
        while True:
            try:
                kind, value = events.get(timeout=0.1)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                cancel.set()
                continue
            if kind == "piece":
                out.write(value)
                out.flush()
                wrote = True
                continue
            if kind == "error":
                if wrote:
                    out.write("\n")
                out.flush()
                click.echo(value, err=True)
                break
            stats = value
            if stats is not None and stats.stop_reason == "cancelled":
                out.write(" [stopped]" if wrote else "[stopped]")
            out.write("\n")
            out.flush()
            if not quiet and stats is not None:
                dropped = conv.last_dropped_messages
                note = f"; dropped the {dropped} oldest messages to fit the context" if dropped else ""
                click.echo(click.style(
                    f"[{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s, prefill {stats.prompt_tokens} "
                    f"tokens, TTFT {stats.ttft_seconds:.2f} s, context {conv.n_tokens}/{conv.capacity}{note}]",
                    dim=True), err=True)
            break
    finally:
        if worker.is_alive():  # leaving early (an error here): stop the worker before going on
            cancel.set()
        worker.join()
        if main:
            signal.signal(signal.SIGINT, old_handler)


@click.command()
@click.option("--model", "-m", type=click.Path(), default=None,
              help="A .edgelm bundle (default: Gemma 3 270M, prepared on first use).")
@click.option("--system", "-s", default=None, help="A system prompt (folded into the first user turn).")
@click.option("--max-tokens", type=int, default=None, help="KV-cache capacity (default: 4096, or the model's context if shorter).")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True,
              help="Longest reply, in tokens.")
@click.option("--temperature", type=float, default=None, help="0 = greedy (default: the bundle's).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (llama.cpp style).")
@click.option("--presence-penalty", type=float, default=None, help="In [-2, 2], OpenAI style.")
@click.option("--frequency-penalty", type=float, default=None, help="In [-2, 2], OpenAI style.")
@click.option("--overflow", type=click.Choice(["truncate", "error"]), default="truncate", show_default=True,
              help="When the context is full: drop the oldest turns, or stop with an error.")
@click.option("--threads", "-t", type=int, default=None, help="Kernel threads (default: physical cores).")
@backend_option
@kv_dtype_option
@attn_precision_option
@deterministic_option
@click.option("--quiet", "-q", is_flag=True, help="No banner or stats lines.")
def chat(model, system, max_tokens, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty,
         presence_penalty, frequency_penalty, overflow, threads, backend, kv_dtype, attn_precision, deterministic,
         quiet):
    """Chat with a model in the terminal."""
    from ..runtime.engine import Engine

    eng = Engine(model, backend=backend, threads=threads, max_tokens=max_tokens,
                 kv_dtype=kv_dtype, deterministic=deterministic, attn_precision=attn_precision)
    sampler = eng.default_sampler.override(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                           repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                           frequency_penalty=frequency_penalty)
    conv = eng.create_conversation(system=system, sampler=sampler, max_new_tokens=max_new_tokens,
                                   overflow=overflow)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    read = _line_reader(interactive)
    out = sys.stdout
    if not quiet:
        click.echo(f"edgelm chat: {eng.path.name}, context {eng.max_tokens} tokens. {HELP}", err=True)
    from ..runtime.modelinfo import BASE_MODEL_NOTICE, is_instruction_tuned

    if is_instruction_tuned(eng.bundle.header) is False:  # shown even with --quiet: it explains the replies
        click.echo(click.style(f"note: {BASE_MODEL_NOTICE}", fg="yellow"), err=True)
    pending: list = []  # images / audio attached to the next message
    while True:
        try:
            line = read("> " if sys.stdin.isatty() else "")
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
            continue
        except EOFError:
            if interactive:
                out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd = text.split()[0].lower()
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd in ("/image", "/audio"):
                _attach(eng, pending, cmd, text[len(cmd):].strip())
            elif cmd == "/reset":
                conv.reset()
                pending.clear()
                click.echo("[new conversation]", err=True)
            elif cmd == "/help":
                click.echo(HELP, err=True)
            else:
                click.echo(f"unknown command {cmd}; {HELP}", err=True)
            continue
        message = line
        if pending:
            from ..runtime.content import Text

            message, pending[:] = [*pending, Text(line)], []
        try:
            _reply(conv, message, out, quiet)
        except KeyboardInterrupt:  # a Ctrl-C between replies: back to the prompt
            out.write("\n")
