"""Multi-turn chat over one Session: the bundle's chat template (sandboxed Jinja), KV reuse
across turns, and a context-overflow policy.

    conv = engine.create_conversation(system="Be brief.", sampler={"temperature": 0})
    reply = conv.send("Hi!")
    for piece in conv.stream("And then?"):
        print(piece, end="")

Each turn re-renders the whole history with the template and feeds the model only what
the session does not already hold: the common prefix with the session's tokens is reused
(see Session.sync), so a normal turn prefills just the new user turn's tokens.
"""

from __future__ import annotations

import datetime
import json
import threading
import weakref
from typing import TYPE_CHECKING, Iterator

from ..errors import BadInputError, CapacityError
from .sampler import SamplerConfig
from .session import GenerationStats, check_stop_strings

if TYPE_CHECKING:
    from .engine import Engine

OVERFLOW_POLICIES = ("error", "truncate")
DEFAULT_MAX_NEW_TOKENS = 512
ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """A chat template compiled in jinja2's ImmutableSandboxedEnvironment (a template from a
    file cannot reach Python internals or mutate its inputs)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise BadInputError("the bundle has no chat template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise BadInputError(f"the chat template does not compile: {e}") from None
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt)
        except _TemplateRaised as e:
            raise BadInputError(f"chat template: {e}") from None
        except TemplateError as e:
            raise BadInputError(f"the chat template failed: {e}") from None


class _TemplateRaised(Exception):
    pass


def _raise_exception(message):
    raise _TemplateRaised(str(message))


_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TEMPLATES_LOCK = threading.Lock()


def get_chat_template(engine: "Engine") -> ChatTemplate:
    """The engine's compiled chat template, compiled once per engine and kept beside it (the
    engine itself is never modified after construction)."""
    with _TEMPLATES_LOCK:
        t = _TEMPLATES.get(engine)
        if t is None:
            tok = engine.tokenizer
            bos = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else ""
            eos = tok.id_to_piece(tok.eos_id) if tok.eos_id is not None else ""
            t = _TEMPLATES[engine] = ChatTemplate(engine.chat_template, bos, eos)
    return t


def check_messages(messages) -> list[dict]:
    """Validate chat messages: a list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise BadInputError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadInputError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadInputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadInputError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def prompt_ids(engine: "Engine", text: str) -> list[int]:
    """Token ids of a rendered chat. The template writes BOS itself ("<bos>" encodes to the
    BOS id), so BOS is added only where the template did not."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_bos=False)
    bos = tok.bos_id
    if engine.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def render_chat(engine: "Engine", messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    text = get_chat_template(engine).render(check_messages(messages), add_generation_prompt)
    return text, prompt_ids(engine, text)


def _check_max_new(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInputError(f"max_new_tokens must be a positive integer, got {n!r}")
    return n


class Conversation:
    """A chat with history on one Session. Not thread-safe, except cancel()."""

    def __init__(self, engine: "Engine", system: str | None = None, sampler: SamplerConfig | dict | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, overflow: str = "error"):
        if system is not None and not isinstance(system, str):
            raise BadInputError("system must be a string")
        if overflow not in OVERFLOW_POLICIES:
            raise BadInputError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        self.engine = engine
        self.template = get_chat_template(engine)
        self.session = engine.create_session(sampler)
        self.system = system or None
        self.max_new_tokens = _check_max_new(max_new_tokens)
        self.overflow = overflow
        self.messages: list[dict] = []  # user/assistant turns (the system prompt is kept apart)
        self.last_stats: GenerationStats | None = None
        self.last_prefill_tokens = 0  # tokens fed to the model for the last turn's prompt
        self.last_dropped_messages = 0  # messages dropped by overflow="truncate" on the last turn
        self.dropped_messages = 0  # ... over the conversation's life
        self._held_text: str | None = None  # the text the session's held tokens spell
        self._busy = threading.Lock()

    # ------------------------------------------------------------------ state

    @property
    def history(self) -> list[dict]:
        """The messages as the template sees them: the system prompt (if any), then the turns."""
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [dict(m) for m in self.messages]

    @property
    def n_tokens(self) -> int:
        return self.session.n_tokens

    @property
    def capacity(self) -> int:
        return self.session.capacity

    def reset(self, system: str | None = ...) -> None:
        """Forget the turns (and the KV state). The system prompt stays unless one is given."""
        if system is not ...:
            self.system = system or None
        self.messages = []
        self.session.reset()
        self._held_text = None

    def cancel(self) -> None:
        """Stop the reply being generated (from any thread) within one decode step."""
        self.session.cancel()

    def render(self, messages: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        return self.template.render(self.history if messages is None else messages, add_generation_prompt)

    # ------------------------------------------------------------------ turns

    def send(self, message: str, **kw) -> str:
        """Add a user message and return the whole reply."""
        return "".join(self.stream(message, **kw))

    def stream(self, message: str, *, max_new_tokens: int | None = None, stop=None,
               cancel: threading.Event | None = None) -> Iterator[str]:
        """Add a user message; returns an iterator of the reply's text pieces. Errors about
        the request (bad input, context overflow with policy "error") are raised here, before
        any work. The turn enters the history when the iterator ends, is closed or is
        cancelled (with the text produced so far)."""
        if not isinstance(message, str):
            raise BadInputError("the message must be a string")
        max_new = self.max_new_tokens if max_new_tokens is None else _check_max_new(max_new_tokens)
        stops = check_stop_strings(stop)
        if not self._busy.acquire(blocking=False):
            raise BadInputError("this conversation is already generating a reply")
        try:
            user = {"role": "user", "content": message}
            turns, text, ids = self._fit(self.messages + [user], max_new)
            self.messages = turns[:-1]  # what truncation kept
            sess = self.session
            if self._held_text is not None and text.startswith(self._held_text) and sess.held_tokens:
                # Fast path: the history re-renders as what the session holds plus new text, which
                # starts at a special-token boundary ("<end_of_turn>..."): tokenize only that.
                tail = self.engine.tokenizer.encode(text[len(self._held_text):], add_bos=False)
                ids = sess.held_tokens + tail
            feed = sess.sync(ids)
            gen = sess.generate(feed, max_new_tokens=max_new, stop=stops, cancel=cancel)
        except BaseException:
            self._busy.release()
            raise
        return self._run(gen, user, text)

    def _fit(self, turns: list[dict], max_new: int):
        """Render; with overflow="truncate" drop the oldest user/assistant pairs until the
        prompt plus max_new fits the capacity."""
        cap = self.capacity
        dropped = 0
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            text = self.template.render(sys_msg + turns, add_generation_prompt=True)
            ids = prompt_ids(self.engine, text)
            if len(ids) + max_new <= cap:
                break
            if self.overflow == "error":
                raise CapacityError(
                    f"the conversation no longer fits: its next turn needs {len(ids)} prompt tokens plus up to "
                    f"{max_new} new tokens, but the KV-cache capacity is {cap}; reset the conversation, use "
                    f"overflow=\"truncate\" to drop the oldest turns, lower max_new_tokens or raise max_tokens")
            if len(turns) <= 1:
                raise CapacityError(
                    f"the message does not fit even on its own: {len(ids)} prompt tokens (with the system prompt) "
                    f"plus up to {max_new} new tokens exceed the KV-cache capacity of {cap}; shorten it, lower "
                    f"max_new_tokens or raise max_tokens")
            turns = turns[2:]  # the oldest user message and its reply
            dropped += 2
        self.last_dropped_messages = dropped
        self.dropped_messages += dropped
        return turns, text, ids

    def _run(self, gen, user: dict, prompt_text: str) -> "_Reply":
        return _Reply(self, gen, user, prompt_text)


class _Reply:
    """The iterator conv.stream() returns. However it ends (exhausted, closed, dropped, or an
    error) it finalizes the turn exactly once and frees the conversation for the next one. A
    reply that was never iterated leaves no turn in the history."""

    def __init__(self, conv: Conversation, gen, user: dict, prompt_text: str):
        self._conv, self._gen, self._user, self._prompt = conv, gen, user, prompt_text
        self._pieces: list[str] = []
        self._started = False
        self._finished = False
        self._stats = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        self._started = True
        try:
            while True:
                item = next(self._gen)
                if isinstance(item, GenerationStats):
                    self._stats = item
                    continue
                self._pieces.append(item)
                return item
        except StopIteration:
            self._finish(True)
            raise
        except BaseException:
            self._finish(False)
            raise

    def close(self) -> None:
        """Stop here; the turn keeps the text produced so far."""
        if not self._finished:
            self._gen.close()
            self._finish(self._started)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _finish(self, record: bool) -> None:
        if self._finished:
            return
        self._finished = True
        conv = self._conv
        try:
            conv.last_stats = self._stats
            if self._stats is not None:
                conv.last_prefill_tokens = self._stats.prompt_tokens
            if record:
                conv.messages = conv.messages + [self._user, {"role": "assistant", "content": "".join(self._pieces)}]
                conv._held_text = self._prompt + conv.engine.tokenizer.decode(conv.session.generated_ids)
            else:
                conv._held_text = None
        finally:
            conv._busy.release()
