"""Multi-turn chat over one Session: the bundle's chat template (sandboxed Jinja), KV reuse
across turns, and a context-overflow policy.

    conv = engine.create_conversation(system="Be brief.", sampler={"temperature": 0})
    reply = conv.send("Hi!")
    for piece in conv.stream("And then?"):
        print(piece, end="")

Each turn re-renders the whole history with the template and feeds the model only what
the session does not already hold: the common prefix with the session's tokens is reused
(see Session.sync), so a normal turn prefills just the new user turn's tokens.

A user message is a string or a list of content parts (runtime/content.py; OpenAI / Hugging
Face dicts too). The template gets them the Hugging Face way, a list of {"type": "text" |
"image" | "audio", ...} items, where it reads typed content (otherwise the text is joined
into one string, as the server does). An Embeddings part of m rows enters the template as a
text item holding SOFT_MARK; the rendered text is tokenized around each mark and the mark
becomes m placeholder ids (the part's token_id) whose embeddings are the part's rows. Cache
reuse compares those rows as well as the ids.
"""

from __future__ import annotations

import datetime
import json
import threading
import weakref
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import BadInputError, CapacityError
from .content import Audio, Embeddings, Image, Text, Tokens, check_part, from_dict
from .engine import check_text
from .sampler import SamplerConfig
from .session import GenerationStats, check_stop_strings

if TYPE_CHECKING:
    from .engine import Engine

OVERFLOW_POLICIES = ("error", "truncate")
DEFAULT_MAX_NEW_TOKENS = 512
ROLES = ("system", "user", "assistant")
# Where an Embeddings part sits in rendered text: characters of the supplementary private use
# area, which no tokenizer gives meaning to; the text is split at each one before tokenizing.
SOFT_MARK = "\U000F0000\U000F0001\U000F0002"


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
        self._typed: bool | None = None
        self._reads_tools: bool | None = None

    @property
    def typed_content(self) -> bool:
        """Whether the template reads Hugging Face typed content (a list of {"type": ...}
        items). Probed once, as llama.cpp's minja does: a message holding one text item must
        render as the same message with string content (a string-only template prints the
        list's repr instead, or fails)."""
        if self._typed is None:
            def probe(content):
                try:
                    return self.render([{"role": "user", "content": content}])
                except Exception:  # e.g. a TypeError from `content + "..."` on a list
                    return None
            as_str, as_list = probe("Hello"), probe([{"type": "text", "text": "Hello"}])
            self._typed = as_list is not None and "Hello" in as_list and as_list == (as_str or as_list)
        return self._typed

    @property
    def reads_tools(self) -> bool:
        """Whether the template renders tool declarations itself (a Hugging Face template that
        reads the `tools` variable). Gemma 3's does not: edgelm then declares tools in the
        system prompt (runtime/tools.py)."""
        import jinja2.meta

        if self._reads_tools is None:
            env = self.template.environment
            self._reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(self.source))
        return self._reads_tools

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt, **extra)
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


def template_messages(messages: list[dict], typed: bool, check=None) -> tuple[list[dict], list[Embeddings]]:
    """Messages as the template takes them: content parts become {"type": ...} items (or one
    string for a template that reads strings only), an Embeddings part a SOFT_MARK text item.
    Also returns the Embeddings parts in order (each passed through check(part, where)), one
    per mark."""
    out, soft = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            _check_unmarked(content, f"messages[{i}].content")
        elif isinstance(content, (list, tuple)):
            items = []
            for j, p in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                p = Text(p) if isinstance(p, str) else from_dict(p, where) if isinstance(p, dict) else p
                if isinstance(p, Text):
                    if not isinstance(p.text, str):
                        raise BadInputError(f"{where}: text must be a string")
                    items.append(_check_unmarked(p.text, where))
                elif isinstance(p, Embeddings):
                    items.append(SOFT_MARK)
                    soft.append(p if check is None else check(p, where))
                elif isinstance(p, (Image, Audio)) and typed:
                    # the template writes the modality's placeholder token; Conversation._render
                    # expands it as the processor does
                    items.append({"type": "image" if isinstance(p, Image) else "audio"})
                    p = p if check is None else check(p, where)
                    if p.encoded:
                        soft.append(p)
                elif isinstance(p, (Image, Audio)):
                    raise BadInputError(f"{where}: the chat template reads string content only, so it has no "
                                        f"place for an {'image' if isinstance(p, Image) else 'audio'} part")
                else:
                    raise BadInputError(f"{where}: expected text or Embeddings, got {type(p).__name__}")
            if typed:
                content = [it if isinstance(it, dict) else {"type": "text", "text": it} for it in items]
            else:
                content = "".join(items)
        out.append({**m, "content": content} if isinstance(m, dict) else m)
    return out, soft


def _check_unmarked(text: str, where: str) -> str:
    if SOFT_MARK in text:
        raise BadInputError(f"{where}: the text holds edgelm's reserved embeddings marker (U+F0000..U+F0002)")
    return text


def prompt_ids(engine: "Engine", text: str) -> list[int]:
    """Token ids of a rendered chat. The template writes BOS itself ("<bos>" encodes to the
    BOS id), so BOS is added only where the template did not."""
    tok = engine.tokenizer
    ids = tok.encode(text, add_bos=False)
    bos = tok.bos_id
    if engine.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def has_tool_fields(messages) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


def template_input(template: ChatTemplate, messages: list[dict], tools=None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) for chat messages that may hold tool calls and
    results, with `tools` declared (runtime/tools.py): the template's own tool support where
    it has one, else edgelm's Gemma convention (declarations in the system prompt, calls and
    results as fenced blocks)."""
    if not tools and not has_tool_fields(messages):
        return messages, {}
    from .tools import tool_messages

    msgs, extra = tool_messages(messages, tools or [], template.reads_tools)
    return msgs, extra


def render_chat(engine: "Engine", messages: list[dict], add_generation_prompt: bool = True,
                tools=None) -> tuple[str, list[int]]:
    """The prompt text and ids of chat messages (roles system, user, assistant; tool and
    assistant tool_calls too, and `tools` declared, see template_input)."""
    template = get_chat_template(engine)
    msgs, extra = template_input(template, messages, tools)
    if not extra.get("tools") and not has_tool_fields(msgs):
        msgs = check_messages(msgs)
    text = template.render(msgs, add_generation_prompt, **extra)
    return text, prompt_ids(engine, text)


def render_marked(engine: "Engine", template: "ChatTemplate", messages: list[dict], add_generation_prompt: bool = True,
                  tools=None, check=None) -> tuple[str, list[Embeddings]]:
    """Chat messages (parts allowed: Embeddings, Image, Audio) rendered by `template`: the text,
    with SOFT_MARK where each soft span goes, and the spans' Embeddings in order (an image or
    audio item expanded as Gemma 3n's processor does, see expand_media). check(part, where)
    validates (and encodes) each part; default check_part."""
    msgs, extra = template_input(template, messages, tools)
    msgs, soft = template_messages(msgs, template.typed_content,
                                   check or (lambda p, where: check_part(engine, p, where)))
    text = template.render(msgs, add_generation_prompt, **extra)
    if any(isinstance(p, (Image, Audio)) for p in soft):
        text, soft = expand_media(engine, text, soft)
    if text.count(SOFT_MARK) != len(soft):
        raise BadInputError(f"the chat template placed {text.count(SOFT_MARK)} of the {len(soft)} embeddings "
                            f"parts; it must render each text item of a message exactly once")
    return text, soft


def render_chat_spans(engine: "Engine", messages: list[dict], add_generation_prompt: bool = True,
                      tools=None) -> tuple[list[int], list[tuple[int, Embeddings]]]:
    """As render_chat, for messages whose content may hold parts (images, audio, embeddings):
    the prompt ids and each soft span as (start, Embeddings)."""
    text, soft = render_marked(engine, get_chat_template(engine), messages, add_generation_prompt, tools)
    return marked_prompt(engine, text, soft)


def expand_media(engine: "Engine", text: str, soft: list) -> tuple[str, list[Embeddings]]:
    """Rendered text whose image/audio placeholder tokens (one per Image/Audio part, in
    order, among the Embeddings marks) become what Gemma 3n's processor makes of them:
    "\n\n" + begin + rows + end + "\n\n" per item (per clip, for long audio), the rows
    as marks. Returns the text and the Embeddings of every mark, in order."""
    import re

    from . import media
    from .content import media_kind

    kinds = {media_kind(p) for p in soft if isinstance(p, (Image, Audio))}
    marks = {kind: media.marker_strings(engine, kind) for kind in kinds}
    by_token = {m[1]: kind for kind, m in marks.items()}
    pattern = "|".join(re.escape(t) for t in [SOFT_MARK, *by_token])
    out, flat, pos, k = [], [], 0, 0
    for hit in re.finditer(pattern, text):
        if k == len(soft):
            raise BadInputError(f"the prompt holds more image/audio placeholder tokens ({hit.group(0)!r}) than "
                                f"the messages have image/audio parts; remove the literal token from the text")
        p, k = soft[k], k + 1
        tok = hit.group(0)
        want = "embeddings" if tok == SOFT_MARK else by_token[tok]
        have = "embeddings" if isinstance(p, Embeddings) else media_kind(p)
        if want != have:
            raise BadInputError(f"the chat template placed a {want} item where the messages have a {have} part "
                                f"(is a literal {tok!r} in the text?)")
        if isinstance(p, Embeddings):
            rep = SOFT_MARK
            flat.append(p)
        else:
            begin, _, end = marks[have]
            rep = "".join(f"\n\n{begin}{SOFT_MARK}{end}\n\n" for _ in p.encoded)
            flat.extend(p.encoded)
        out += [text[pos:hit.start()], rep]
        pos = hit.end()
    if k != len(soft):
        raise BadInputError(f"the chat template placed {k} of the {len(soft)} embeddings/image/audio parts; it "
                            f"must render each item of a message exactly once")
    return "".join(out) + text[pos:], flat


def encode_marked(engine: "Engine", text: str, soft: list[Embeddings], at: int = 0) -> tuple[list[int], list[tuple[int, Embeddings]]]:
    """Token ids of rendered text, each mark replaced by its part's placeholder ids, and the
    start of each part's rows (positions counted from `at`). The text between marks is
    tokenized apart, as llama.cpp's mtmd tokenizes around its media markers."""
    ids: list[int] = []
    spans = []
    for k, seg in enumerate(text.split(SOFT_MARK)):
        if k:
            p = soft[k - 1]
            spans.append((at + len(ids), p))
            ids += [p.token_id] * len(p.values)
        if seg:
            ids += engine.tokenizer.encode(seg, add_bos=False)
    return ids, spans


def marked_prompt(engine: "Engine", text: str, soft: list[Embeddings]):
    """encode_marked's ids and spans with BOS in front where the template wrote none."""
    ids, spans = encode_marked(engine, text, soft)
    bos = engine.tokenizer.bos_id
    if engine.add_bos and bos is not None and (not ids or ids[0] != bos):  # as prompt_ids
        return [bos, *ids], [(s + 1, p) for s, p in spans]
    return ids, spans


def _check_max_new(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInputError(f"max_new_tokens must be a positive integer, got {n!r}")
    return n


class Conversation:
    """A chat with history on one Session. Not thread-safe, except cancel()."""

    def __init__(self, engine: "Engine", system: str | None = None, sampler: SamplerConfig | dict | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, overflow: str = "error", tools=None,
                 tool_choice: str = "auto"):
        from .tools import coerce_tools

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
        # (start, Embeddings) of each soft span in the session's tokens, as they were fed
        self._held_soft: list[tuple[int, Embeddings]] = []
        self._busy = threading.Lock()
        # tools the model may call (runtime/tools.py): functions, Tools or JSON declarations
        self.tools = coerce_tools(tools)
        self.tool_choice = self._check_choice(tool_choice)
        self.last_tool_calls: list = []  # the calls in the last reply (ToolCall)
        self.last_tool_error = None  # a ToolCallError where the last reply's call was malformed
        self._tool_constraints: dict = {}
        self._calls: dict = {}  # id -> ToolCall, of the calls in the history

    # ------------------------------------------------------------------ state

    @property
    def history(self) -> list[dict]:
        """The messages as the template sees them: the system prompt (if any), then the turns."""
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + [{**m, "content": list(m["content"])} if isinstance(m.get("content"), list) else dict(m)
                          for m in self.messages]

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
        self._calls = {}
        self.last_tool_calls, self.last_tool_error = [], None
        self.session.reset()
        self._held_text = None
        self._held_soft = []

    def cancel(self) -> None:
        """Stop the reply being generated (from any thread) within one decode step."""
        self.session.cancel()

    def render(self, messages: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text; an Embeddings part shows as its placeholder token once per row (the
        text its ids spell)."""
        text, soft = self._render(self.history if messages is None else messages, add_generation_prompt)
        pieces = text.split(SOFT_MARK)
        return pieces[0] + "".join(self._piece(p.token_id) * len(p.values) + s for p, s in zip(soft, pieces[1:]))

    def _piece(self, i: int) -> str:
        tok = self.engine.tokenizer
        return tok.id_to_piece(i) if i < tok.vocab_size else f"<{i}>"  # rows past the tokenizer's vocabulary

    def _render(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[Embeddings]]:
        # The history's parts were checked when sent; this catches parts edited in since (a
        # checked part comes back as itself, which the fast path in stream() relies on).
        return render_marked(self.engine, self.template, messages, add_generation_prompt, self.tools,
                             self._check_rendered)

    def _check_rendered(self, p, where: str):
        """A part of a message being rendered, checked (and an image/audio part encoded). On a
        bundle without the part's tower the part stays as it is: render() shows the template's
        placeholder, and sending it is refused by _check_message."""
        if isinstance(p, (Image, Audio)):
            from .content import media_kind
            from .media import modality

            if modality(self.engine, media_kind(p)) is None:
                return p
        return check_part(self.engine, p, where)

    def _encode(self, text: str, soft: list[Embeddings], at: int = 0):
        return encode_marked(self.engine, text, soft, at)

    def _prompt(self, text: str, soft: list[Embeddings]):
        return marked_prompt(self.engine, text, soft)

    def _check_message(self, message):
        """A user message as the history keeps it: the string, or its parts checked, with each
        Embeddings part's rows copied read-only (rows changed by the caller afterwards must
        not silently disagree with the KV computed from them)."""
        if isinstance(message, str):
            check_text(message)
            return _check_unmarked(message, "message")
        if not isinstance(message, (list, tuple)):
            raise BadInputError(f"the message must be a string or a list of content parts, got "
                                f"{type(message).__name__}")
        parts = []
        for j, p in enumerate(message):
            where = f"message[{j}]"
            p = check_part(self.engine, p, where)
            if isinstance(p, Tokens):
                raise BadInputError(f"{where}: token ids cannot go through the chat template; give text or Embeddings")
            if isinstance(p, Text):
                _check_unmarked(p.text, where)
            elif isinstance(p, (Image, Audio)):
                pass  # encoded by check_part; its rows are read-only arrays
            else:
                v = np.array(p.values, dtype=np.float32, order="C")
                v.setflags(write=False)
                p = Embeddings(v, p.token_id)
            parts.append(p)
        return parts

    # ------------------------------------------------------------------ turns

    def send(self, message, **kw) -> str:
        """Add a user message and return the whole reply."""
        return "".join(self.stream(message, **kw))

    def stream(self, message, *, max_new_tokens: int | None = None, stop=None,
               cancel: threading.Event | None = None, constraint=None, tool_choice: str | None = None
               ) -> Iterator[str]:
        """Add a user message (a string or a list of content parts); returns an iterator of the
        reply's text pieces. Errors about the request (bad input, context overflow with policy
        "error") are raised here, before any work and with the conversation unchanged. The
        turn enters the history when the iterator ends, is closed or is cancelled (with the
        text produced so far). constraint: as Session.generate's (a JSON Schema, regex, ...
        that the reply must follow).

        With tools declared, a reply may call them (see run() for the whole loop): the calls
        are in `last_tool_calls` once the reply ends, and the history keeps them as the
        assistant's `tool_calls`. Add each result with add_tool_result(), then continue with
        stream(None). tool_choice overrides the conversation's for this reply: "auto" (a call,
        once begun, is kept well formed by a grammar), "required" (the reply is one call),
        "none", or a tool's name (the reply is a call to it)."""
        if message is None:
            if not self.messages or self.messages[-1].get("role") != "tool":
                raise BadInputError("a message is required (None continues only after add_tool_result())")
            content = None
        else:
            content = self._check_message(message)
        choice = self.tool_choice if tool_choice is None else self._check_choice(tool_choice)
        if self.tools and choice != "none":
            if constraint is not None:
                raise BadInputError("a constraint cannot be combined with tool calls; pass tool_choice=\"none\"")
            constraint = self._tool_constraint(choice)
        max_new = self.max_new_tokens if max_new_tokens is None else _check_max_new(max_new_tokens)
        stops = check_stop_strings(stop)
        if not self._busy.acquire(blocking=False):
            raise BadInputError("this conversation is already generating a reply")
        try:
            user = None if content is None else {"role": "user", "content": content}
            turns, text, ids, spans, soft = self._fit(self.messages + ([user] if user else []), max_new)
            self.messages = turns[:-1] if user else turns  # what truncation kept
            sess = self.session
            held = sess.held_tokens
            n_marks = self._held_text.count(SOFT_MARK) if self._held_text is not None else -1
            if (held and self._held_text is not None and text.startswith(self._held_text)
                    and len(self._held_soft) == n_marks and all(a is b for (_, a), b in zip(self._held_soft, soft))):
                # Fast path: the history re-renders as what the session holds (the same parts,
                # by identity) plus new text, which starts at a special-token boundary
                # ("<end_of_turn>..."): tokenize only that.
                tail, tail_spans = self._encode(text[len(self._held_text):], soft[n_marks:], len(held))
                ids, spans = held + tail, self._held_soft + tail_spans
            # Equal ids are not enough where soft rows sit: the KV from the first row that
            # differs (or is soft on one side only) is stale.
            c = sess.common_prefix(ids)
            d = _first_soft_difference(self._held_soft, spans, c)
            if d < c and not sess.rewind(d):
                sess.reset()
            feed = sess.sync(ids)
            self._held_soft = spans  # right for whatever prefix of ids the session holds from here on
            gen = sess.generate(_feed_parts(feed, len(ids) - len(feed), spans), max_new_tokens=max_new, stop=stops,
                                cancel=cancel, constraint=constraint)
        except BaseException:
            self._busy.release()
            raise
        return _Reply(self, gen, user, text, choice if self.tools else "none")

    def add_tool_result(self, call, result) -> None:
        """Add a tool's result for a call of the last reply (a ToolCall, or its id), as a
        `tool` message; the next stream(None) lets the model read it."""
        from .tools import ToolCall

        cid = call.id if isinstance(call, ToolCall) else call
        calls = self._calls
        if cid not in calls:
            raise BadInputError(f"no tool call with id {cid!r} in the conversation")
        if not isinstance(result, str):
            result = json.dumps(result, ensure_ascii=False, default=str)
        check_text(result)
        self.messages = self.messages + [{"role": "tool", "tool_call_id": cid, "name": calls[cid].name,
                                          "content": result}]

    def run(self, message, *, confirm=None, max_rounds: int = 8, **kw) -> str:
        """Send a message and run the tool-call loop: while the reply calls tools, ask
        `confirm(call)` (if given; False declines the call, and the model is told so), run each
        tool's function and feed the results back, then let the model continue. Returns the
        final reply's text. `tool_choice=` (with the other stream() arguments in `kw`) applies
        to the first reply only; the later ones use the conversation's. A call to a tool
        without a function, a malformed call, or more than `max_rounds` rounds of calls is an
        error (the history keeps what happened)."""
        from .tools import ToolCallError, run_tool

        if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
            raise BadInputError(f"max_rounds must be a positive integer, got {max_rounds!r}")
        if confirm is not None and not callable(confirm):
            raise BadInputError("confirm must be a function of a ToolCall that returns True or False")
        tools = {t.name: t for t in self.tools}
        reply = self.send(message, **kw)
        kw.pop("tool_choice", None)  # it chose the first reply's kind; the model decides the rest
        for _ in range(max_rounds):
            if self.last_tool_error is not None:
                raise self.last_tool_error
            if not self.last_tool_calls:
                return reply
            for call in self.last_tool_calls:
                tool = tools[call.name]
                if tool.fn is None:
                    raise BadInputError(f"the model called {call.name!r}, which has no Python function here: run "
                                        f"it yourself, add_tool_result() and stream(None)")
                if confirm is not None and not confirm(call):
                    result = "error: the user declined this call"
                else:
                    result = run_tool(tool, call)
                self.add_tool_result(call, result)
            reply = self.send(None, **kw)
        if self.last_tool_error is not None:
            raise self.last_tool_error
        if self.last_tool_calls:
            raise ToolCallError(f"the model was still calling tools after {max_rounds} rounds (max_rounds)",
                                text=reply)
        return reply

    def _check_choice(self, choice) -> str:
        names = {t.name for t in self.tools}
        if choice in ("auto", "none", "required") or (isinstance(choice, str) and choice in names):
            if choice == "required" and not names:
                raise BadInputError("tool_choice is 'required' but the conversation has no tools")
            return choice
        raise BadInputError(f"tool_choice must be 'auto', 'none', 'required' or a tool's name "
                            f"({', '.join(sorted(names)) or 'no tools'}), got {choice!r}")

    def _tool_constraint(self, choice: str):
        """The grammar that keeps calls well formed (built once per choice)."""
        c = self._tool_constraints.get(choice)
        if c is None:
            from .constrained import Constraint, Triggered, vocabulary
            from .tools import TRIGGER, call_grammar

            vocab = vocabulary(self.engine)
            for t in (TRIGGER + "\n", "\n```"):
                if not vocab.can_spell(t):
                    raise BadInputError(f"this model's vocabulary cannot write {t!r}, which the tool-call format needs")
            if choice == "auto":
                c = Triggered(TRIGGER, Constraint(self.engine, lark=call_grammar(self.tools, fenced=False)))
            else:
                c = Constraint(self.engine, lark=call_grammar(
                    self.tools, fenced=True, name=None if choice == "required" else choice))
            self._tool_constraints[choice] = c
        return c

    def _fit(self, turns: list[dict], max_new: int):
        """Render; with overflow="truncate" drop the oldest user/assistant pairs until the
        prompt plus max_new fits the capacity."""
        cap = self.capacity
        dropped = 0
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            text, soft = self._render(sys_msg + turns, add_generation_prompt=True)
            ids, spans = self._prompt(text, soft)
            if len(ids) + max_new <= cap:
                break
            if self.overflow == "error":
                raise CapacityError(
                    f"the conversation no longer fits: its next turn needs {len(ids)} prompt tokens plus up to "
                    f"{max_new} new tokens, but the KV-cache capacity is {cap}; reset the conversation, use "
                    f"overflow=\"truncate\" to drop the oldest turns, lower max_new_tokens or raise max_tokens")
            if sum(m.get("role") == "user" for m in turns) <= 1:
                raise CapacityError(
                    f"the message does not fit even on its own: {len(ids)} prompt tokens (with the system prompt) "
                    f"plus up to {max_new} new tokens exceed the KV-cache capacity of {cap}; shorten it, lower "
                    f"max_new_tokens or raise max_tokens")
            # the oldest exchange: a user message and everything up to the next user message
            k = 1
            while k < len(turns) - 1 and turns[k].get("role") != "user":
                k += 1
            turns = turns[k:]
            dropped += k
        self.last_dropped_messages = dropped
        self.dropped_messages += dropped
        return turns, text, ids, spans, soft


def _first_soft_difference(a: list[tuple[int, Embeddings]], b: list[tuple[int, Embeddings]], n: int) -> int:
    """The first position below n where the soft spans a and b disagree (n where none does)."""
    for (sa, pa), (sb, pb) in zip(a, b):
        if min(sa, sb) >= n:
            return n
        if sa != sb:
            return min(sa, sb)
        if pa is pb:
            continue
        va, vb = pa.values, pb.values
        k = min(len(va), len(vb))
        diff = np.flatnonzero((va[:k] != vb[:k]).any(axis=1))
        if diff.size:
            return min(sa + int(diff[0]), n)
        if len(va) != len(vb):
            return min(sa + k, n)
    rest = a[len(b):] or b[len(a):]
    return min(rest[0][0], n) if rest else n


def _feed_parts(feed: list[int], start: int, spans: list[tuple[int, Embeddings]]):
    """What Session.generate takes for feed = ids[start:]: the ids themselves where no soft
    row falls in them, else Tokens and Embeddings parts (the rows from `start` on)."""
    parts: list = []
    at = start
    for s, p in spans:
        end = s + len(p.values)
        if end <= start:
            continue
        a = max(s, start)
        if a > at:
            parts.append(Tokens(feed[at - start:a - start]))
        parts.append(Embeddings(p.values[a - s:], p.token_id))
        at = end
    if not parts:
        return feed
    if at < start + len(feed):
        parts.append(Tokens(feed[at - start:]))
    return parts


class _Reply:
    """The iterator conv.stream() returns. However it ends (exhausted, closed, dropped, or an
    error) it finalizes the turn exactly once and frees the conversation for the next one. A
    reply that was never iterated leaves no turn in the history."""

    def __init__(self, conv: Conversation, gen, user: dict | None, prompt_text: str, tool_choice: str = "none"):
        self._conv, self._gen, self._user, self._prompt = conv, gen, user, prompt_text
        self._tool_choice = tool_choice
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

    def _calls(self, reply: dict) -> dict:
        """The reply as the history keeps it, with the calls it makes as tool_calls."""
        from .tools import ToolCallError, parse_tool_calls

        conv = self._conv
        cut = self._stats is None or self._stats.stop_reason in ("max_new_tokens", "cancelled")
        try:
            content, calls = parse_tool_calls(reply["content"], conv.tools, allow_unclosed=cut)
        except ToolCallError as e:
            conv.last_tool_error = e
            return reply
        if not calls:
            return reply
        conv.last_tool_calls = calls
        conv._calls.update((c.id, c) for c in calls)
        return {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}

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
            conv.last_tool_calls, conv.last_tool_error = [], None
            if record:
                reply = {"role": "assistant", "content": "".join(self._pieces)}
                if self._tool_choice != "none":
                    reply = self._calls(reply)
                conv.messages = conv.messages + ([self._user] if self._user else []) + [reply]
                conv._held_text = self._prompt + conv.engine.tokenizer.decode(conv.session.generated_ids)
            else:
                conv._held_text = None
        finally:
            conv._busy.release()
