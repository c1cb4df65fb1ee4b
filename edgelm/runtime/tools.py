"""Tool calling in Gemma's format (Gemma 3 has no tool tokens).

The function declarations go into the system prompt (`gemma_tool_prompt`); the model calls
a function by replying with a fenced block, one call per block,

    ```tool_call
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ```

and the results come back as one user turn of ```tool_output blocks (`tool_messages`).
Here are the pure parts: declarations (`Tool`, `tool_from_function`, `coerce_tools`), the
prompt, the message conversion, a Lark grammar for one call (`call_grammar`, for
`Constraint(engine, lark=...)`), parsing a reply (`parse_tool_calls`) or a stream of pieces
(`ToolCallStream`), and running a call (`run_tool`)."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import inspect
import json
import re
import secrets
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BadInputError, EdgelmError
from .constrained import JSON_DEFAULTS

TRIGGER = "```tool_call"
FENCES = ((TRIGGER, "```"), ("<tool_call>", "</tool_call>"))  # (opening, closing); the second from some fine-tunes
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)
_W = r"[ \t\n\r]*"  # JSON whitespace
_HEAD = re.compile(_W + r'\{' + _W + r'"name"' + _W + ":" + _W + r'"([A-Za-z0-9_-]{1,64})"')
_ARGS_HEAD = re.compile(_HEAD.pattern + _W + "," + _W + r'"arguments"' + _W + ":" + _W + r"(?=\{)")


class ToolCallError(EdgelmError):
    """A reply's tool call cannot be read. `text` is the reply; `partial` is True when the
    only problem is a block that was opened and not closed (a reply cut short)."""

    def __init__(self, message: str, *, text: str = "", partial: bool = False):
        super().__init__(message)
        self.text, self.partial = text, partial


@dataclass(frozen=True)
class Tool:
    """A function the model may call: `parameters` is the JSON schema (type object) of its
    arguments; `fn` runs it (None for a declaration only)."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    fn: Callable | None = None

    def to_openai(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolCall:
    """One call the model made; `arguments_json` is the arguments' JSON text as written."""

    id: str
    name: str
    arguments: dict
    arguments_json: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ----------------------------------------------------------------------- declarations

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARRAYS = (list, set, frozenset, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Set)


def _type_schema(tp, where: str, defs: dict, seen: tuple = ()) -> dict:
    """The JSON schema of a Python annotation; pydantic models' `$defs` are hoisted into `defs`."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    if tp is None or tp is type(None):
        return {"type": "null"}
    if isinstance(tp, type) and tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def sub(t):
        return _type_schema(t, where, defs, seen)
    if origin is typing.Annotated:  # Annotated[str, "the city"]: a description
        notes = [a for a in args[1:] if isinstance(a, str)]
        return {**sub(args[0]), "description": notes[0]} if notes else sub(args[0])
    if origin in (typing.Union, types.UnionType):
        alts = [sub(a) for a in args if a is not type(None)] + ([{"type": "null"}] if type(None) in args else [])
        return alts[0] if len(alts) == 1 else {"anyOf": alts}
    if origin is typing.Literal:
        return {"enum": [a.value if isinstance(a, enum.Enum) else a for a in args]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if (tp is tuple or origin is tuple) and args and args[-1] is not Ellipsis:
        return {"type": "array", "prefixItems": [sub(a) for a in args], "minItems": len(args), "maxItems": len(args)}
    if tp in _ARRAYS or origin in _ARRAYS or tp is tuple or origin is tuple:
        return {"type": "array", **({"items": sub(args[0])} if args else {})}
    if tp is dict or origin in (dict, collections.abc.Mapping):
        if args and args[0] is not str:
            raise BadInputError(f"{where}: JSON object keys are strings, not {args[0]!r}")
        return {"type": "object", **({"additionalProperties": sub(args[1])} if args else {})}
    if isinstance(tp, type) and hasattr(tp, "model_json_schema"):  # a pydantic model
        schema = dict(tp.model_json_schema())
        defs.update(schema.pop("$defs", {}))
        return schema
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or typing.is_typeddict(tp)):
        if tp in seen:
            raise BadInputError(f"{where}: {tp.__name__} refers to itself, which a tool schema cannot spell")
        hints = typing.get_type_hints(tp, include_extras=True)
        if dataclasses.is_dataclass(tp):
            fields = dataclasses.fields(tp)
            names = [f.name for f in fields]
            required = [f.name for f in fields if f.default is dataclasses.MISSING is f.default_factory]
        else:
            names, required = list(hints), [k for k in hints if k in tp.__required_keys__]
        props = {k: _type_schema(hints.get(k, Any), where, defs, seen + (tp,)) for k in names}
        return {"type": "object", "properties": props, **({"required": required} if required else {}),
                "additionalProperties": False}
    raise BadInputError(f"{where}: the type {tp!r} has no JSON schema (use str, int, float, bool, None, "
                        "list, tuple, dict, Literal, an Enum, a dataclass, a TypedDict or a pydantic model)")


_ARGS_SECTION = re.compile(r"(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments)\s*:")
_SECTION = re.compile(r"(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Returns?|Yields?|Raises"
                      r"|Examples?|Notes?|Attributes|See Also|Warnings?|Todo)\s*:?")
_GOOGLE = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")  # name (type): text
_SPHINX = re.compile(r":param\s+(?:[^:]*\s)?\*{0,2}(\w+)\s*:\s*(.*)")  # :param [type] name: text


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: text}) of a docstring: its first paragraph, and the entries
    of a Google `Args:` section or Sphinx `:param name:` fields (continuation lines indented
    deeper than the entry)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    desc = []
    for ln in lines:
        if not ln.strip() or _SECTION.fullmatch(ln.strip()) or ln.lstrip().startswith(":"):
            break
        desc.append(ln.strip())
    params: dict[str, str] = {}
    current, current_indent, args_indent = None, 0, None
    for ln in lines:
        s, indent = ln.strip(), len(ln) - len(ln.lstrip())
        if not s:
            continue
        if current and indent > current_indent:
            params[current] += " " + s
            continue
        current = None
        if args_indent is not None and indent <= args_indent:
            args_indent = None  # the Args section ends at the next line as far out as its header
        m = _SPHINX.fullmatch(s) or (_GOOGLE.fullmatch(s) if args_indent is not None else None)
        if m:
            current, current_indent, params[m.group(1)] = m.group(1), indent, m.group(2).strip()
        elif _ARGS_SECTION.fullmatch(s):
            args_indent = indent
    return " ".join(desc), {k: v.strip() for k, v in params.items()}


def tool_from_function(fn: Callable, name: str | None = None) -> Tool:
    """A Tool whose schema comes from `fn`'s signature, type hints and docstring: every
    parameter without a default is required, no other keys are allowed; *args, **kwargs
    and positional-only parameters are a BadInputError."""
    if not callable(fn):
        raise BadInputError(f"a tool must be callable, got {type(fn).__name__}")
    target = fn if inspect.isroutine(fn) or isinstance(fn, type) else type(fn).__call__
    name = name or getattr(fn, "__name__", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadInputError(f"the tool name {name!r} must match {NAME_PATTERN}; pass name=")
    try:
        sig, hints = inspect.signature(fn), typing.get_type_hints(target, include_extras=True)
    except (TypeError, ValueError, NameError) as e:
        raise BadInputError(f"function {name}: cannot read its signature and type hints: {e}") from None
    description, docs = parse_docstring(inspect.getdoc(target))
    props, required, defs = {}, [], {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
            raise BadInputError(f"function {name}: {star}{p.name} cannot be a tool parameter (a tool takes "
                                "named arguments from one JSON object)")
        s = dict(_type_schema(hints.get(p.name, p.annotation), f"function {name}, parameter {p.name!r}", defs))
        if docs.get(p.name) and "description" not in s:
            s["description"] = docs[p.name]
        if p.default is p.empty:
            required.append(p.name)
        else:
            default = p.default.value if isinstance(p.default, enum.Enum) else p.default
            try:
                s["default"] = json.loads(json.dumps(default))
            except (TypeError, ValueError):
                pass  # not JSON: left out
        props[p.name] = s
    params = {"type": "object", "properties": props, **({"required": required} if required else {}),
              "additionalProperties": False, **({"$defs": defs} if defs else {})}
    return Tool(name, description, params, fn)


def coerce_tools(tools) -> list[Tool]:
    """Checked Tools from a list of Tool, functions, OpenAI declarations {"type": "function",
    "function": {...}} or bare {"name", "description", "parameters"} dicts."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise BadInputError(f"tools must be a list, got {type(tools).__name__}")
    out: list[Tool] = []
    seen: dict[str, int] = {}
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if callable(t) and not isinstance(t, Tool):
            try:
                t = tool_from_function(t)
            except BadInputError as e:
                raise BadInputError(f"{where}: {e}") from None
        if isinstance(t, Tool):
            name, desc, params, fn = t.name, t.description, t.parameters, t.fn
        elif isinstance(t, dict):
            if "function" in t:
                if t.get("type", "function") != "function":
                    raise BadInputError(f'{where}.type must be "function", got {t.get("type")!r}')
                t, where = t["function"], f"{where}.function"
                if not isinstance(t, dict):
                    raise BadInputError(f"{where} must be an object")
            if t.get("strict") not in (None, True, False):
                raise BadInputError(f"{where}.strict must be true or false")
            name, desc, params, fn = t.get("name"), t.get("description"), t.get("parameters"), None
        else:
            raise BadInputError(f"{where} must be a Tool, a function or a function declaration, got {type(t).__name__}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadInputError(f"{where}.name must match {NAME_PATTERN}, got {name!r}")
        if name in seen:
            raise BadInputError(f"{where}.name {name!r} repeats tools[{seen[name]}]")
        seen[name] = i
        if desc is not None and not isinstance(desc, str):
            raise BadInputError(f"{where}.description must be a string, got {type(desc).__name__}")
        params = {"type": "object", "properties": {}} if params is None else params
        if not isinstance(params, dict):
            raise BadInputError(f"{where}.parameters must be a JSON schema object, got {type(params).__name__}")
        if params.get("type", "object") != "object":
            raise BadInputError(f'{where}.parameters.type must be "object" (arguments are a JSON object), '
                                f"got {params.get('type')!r}")
        try:
            json.dumps(params)
        except (TypeError, ValueError) as e:
            raise BadInputError(f"{where}.parameters is not JSON: {e}") from None
        out.append(Tool(name, desc or "", {"type": "object", **params}, fn))
    return out


# ----------------------------------------------------------------------- prompt, messages

def _call_text(name: str, args_json: str) -> str:
    return f'{TRIGGER}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args_json}}}\n```'


def gemma_tool_prompt(tools) -> str:
    """The system-prompt text that declares `tools` and says how to call them ("" for none)."""
    tools = coerce_tools(tools)
    decls = [json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                        ensure_ascii=False) for t in tools]
    return "" if not tools else (
        "You can call the functions declared below. To call one, reply with a block of exactly this "
        "form and nothing else (no text before or after it):\n"
        + _call_text("function_name", '{"parameter": "value"}') + "\n"
        "Write one call per block; for several calls, write one block after another. The arguments are a "
        "JSON object that follows the function's parameters schema. The results come back in "
        "```tool_output blocks. If no function is needed, answer normally, without a block.\n\n"
        "Functions:\n" + "\n".join(decls))


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadInputError(f"{where} must be a string or a list of text parts")


def _calls_of(m: dict, i: int) -> list[tuple[str | None, str, dict, str]]:
    """(id, name, arguments, arguments' JSON text) of each of an assistant message's tool_calls."""
    calls = m.get("tool_calls") or []
    if not isinstance(calls, list):
        raise BadInputError(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise BadInputError(f"{where}.function must be an object with a name")
        args = f.get("arguments", {})
        text = args.strip() if isinstance(args, str) else None
        try:
            args = json.loads(text) if text is not None else args
        except json.JSONDecodeError as e:
            raise BadInputError(f"{where}.function.arguments is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise BadInputError(f"{where}.function.arguments must be a JSON object")
        out.append((c.get("id"), f["name"], args, text or json.dumps(args, ensure_ascii=False)))
    return out


def tool_messages(messages: list[dict], tools, template_reads_tools: bool = False) -> tuple[list[dict], dict]:
    """(messages for the chat template, its extra kwargs) from OpenAI-style messages. For a
    template without tools: the tool prompt ends the system message (made if absent); an
    assistant's tool_calls become ```tool_call blocks after its content (arguments given as
    a string are kept as written); a run of tool messages becomes one user message of
    ```tool_output blocks, which a user message right after joins. With
    `template_reads_tools`: the messages with arguments as dicts, and {"tools": [...]}."""
    tools = coerce_tools(tools)
    if not isinstance(messages, list):
        raise BadInputError("messages must be a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise BadInputError(f"messages[{i}].role must be one of system, user, assistant, tool")
    if template_reads_tools:
        out = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": args}}
                                    for c, (_, _, args, _) in zip(m["tool_calls"], _calls_of(m, i))]}
               if m.get("tool_calls") else m for i, m in enumerate(messages)]
        return out, ({"tools": [t.to_openai() for t in tools]} if tools else {})
    out, outputs, names = [], [], {}
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "tool":
            cid, name = m.get("tool_call_id"), m.get("name")
            if cid is not None or not isinstance(name, str):
                if cid not in names:
                    raise BadInputError(f"messages[{i}].tool_call_id {cid!r} matches no earlier assistant tool call")
                name = names[cid]
            text = _text_of(m.get("content"), f"messages[{i}].content")
            try:  # a JSON object or array is shown as JSON, anything else as a string
                value = json.loads(text)
                value = value if isinstance(value, (dict, list)) else text
            except json.JSONDecodeError:
                value = text
            output = json.dumps({"name": name, "content": value}, ensure_ascii=False)
            outputs.append(f"```tool_output\n{output}\n```")
            continue
        if outputs:  # the results end here: one user turn, with this message if it is the user's
            block, outputs, c = "\n".join(outputs), [], m.get("content")
            if role == "user" and isinstance(c, (str, list)):
                m = {**m, "content": block + "\n\n" + c if isinstance(c, str) else
                     [{"type": "text", "text": block + "\n\n"}, *c]}
            else:
                out.append({"role": "user", "content": block})
        if role == "assistant" and m.get("tool_calls"):
            calls = _calls_of(m, i)
            names.update({cid: name for cid, name, _, _ in calls if cid is not None})
            text = _text_of(m.get("content"), f"messages[{i}].content").strip()
            fences = "\n".join(_call_text(name, aj) for _, name, _, aj in calls)
            m = {**{k: v for k, v in m.items() if k != "tool_calls"}, "content": (text + "\n" if text else "") + fences}
        out.append(m)
    if outputs:
        out.append({"role": "user", "content": "\n".join(outputs)})
    prompt = gemma_tool_prompt(tools)
    if prompt and out and out[0]["role"] == "system":
        c = out[0].get("content")
        out[0] = {**out[0], "content": [*c, {"type": "text", "text": "\n\n" + prompt}] if isinstance(c, list)
                  else (c.rstrip() + "\n\n" if c else "") + prompt}
    elif prompt:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


# ----------------------------------------------------------------------- grammar

def call_grammar(tools, *, fenced: bool, name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call `{"name": ..., "arguments":
    ...}`, written compactly: with `fenced`, the whole ```tool_call block; without, what
    follows TRIGGER ("\\n" + call + "\\n```"). `name` allows that tool only."""
    tools = coerce_tools(tools)
    if name is not None:
        tools = [t for t in tools if t.name == name]
        if not tools:
            raise BadInputError(f"tool_choice names {name!r}, which is not one of the tools")
    if not tools:
        raise BadInputError("a tool-call grammar needs at least one tool")
    alts, rules = [], []
    for k, t in enumerate(tools):
        schema = {**t.parameters, "x-guidance": t.parameters.get("x-guidance", JSON_DEFAULTS)}
        head = json.dumps({"name": t.name, "arguments": 0})[:-2]  # '{"name": "...", "arguments": '
        alts.append(f'{json.dumps(head)} args{k} "}}"')
        rules.append(f"args{k}: %json {json.dumps(schema)}")
    start = json.dumps(TRIGGER + "\n" if fenced else "\n")
    return "\n".join([f'start: {start} call "\\n```"', "call: " + " | ".join(alts), *rules]) + "\n"


# ----------------------------------------------------------------------- parsing

class _Bad(Exception):
    """Malformed call JSON: what, and where."""

    def __init__(self, msg: str, pos: int):
        self.msg, self.pos = msg, pos


_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    return len(text) - len(text[i:].lstrip(" \t\n\r"))


def _envelope(text: str, i: int) -> tuple[dict, dict, int]:
    """The JSON object at text[i:] after whitespace: (fields, {key: (start, end) of the value's
    text}, end)."""
    fields, spans, i = {}, {}, _skip(text, i)
    if not text.startswith("{", i):
        raise _Bad("expected '{'", i)
    i = _skip(text, i + 1)
    while not text.startswith("}", i) or fields:
        if not text.startswith('"', i):
            raise _Bad("expected a key in double quotes", i)
        try:
            key, end = json.decoder.scanstring(text, i + 1)
            if key in fields:
                raise _Bad(f"the key {key!r} repeats", i)
            i = end
            if not text.startswith(":", i := _skip(text, i)):
                raise _Bad("expected ':'", i)
            start = _skip(text, i + 1)
            fields[key], end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise _Bad(e.msg, e.pos) from None
        spans[key], i = (start, end), _skip(text, end)
        if text.startswith("}", i):
            break
        if not text.startswith(",", i):
            raise _Bad("expected ',' or '}'", i)
        i = _skip(text, i + 1)
    return fields, spans, i + 1


def _make_call(text, fields, spans, names, k, call_id=None) -> ToolCall:
    name = fields.get("name")
    if not isinstance(name, str):
        raise ToolCallError(f'tool call {k}: no "name" string', text=text)
    if name not in names:
        raise ToolCallError(f"tool call {k}: unknown function {name!r}; the functions are: "
                            f"{', '.join(names) or '(none)'}", text=text)
    key = next((key for key in ("arguments", "parameters") if key in fields), None)
    args, args_json = (fields[key], text[slice(*spans[key])]) if key else ({}, "{}")
    if not isinstance(args, dict):
        raise ToolCallError(f"tool call {k}: the arguments must be a JSON object, got {type(args).__name__}", text=text)
    return ToolCall(call_id or new_call_id(), name, args, args_json)


def _scan(text, body, closer, names, k, call_id=None):
    """The call whose JSON starts at text[body:]: (ToolCall, end after the closer), or None
    while the block is open. Malformed JSON or text before the closer: ToolCallError."""
    try:
        fields, spans, end = _envelope(text, body)
    except _Bad as e:
        if closer not in text[body:]:
            return None
        raise ToolCallError(f"tool call {k}: malformed JSON at character {e.pos}: {e.msg}", text=text) from None
    j = _skip(text, end)
    if text.startswith(closer, j):
        return _make_call(text, fields, spans, names, k, call_id), j + len(closer)
    if closer.startswith(text[j:]):
        return None
    raise ToolCallError(f"tool call {k}: expected {closer} after the call at character {j}, got {text[j:j + 12]!r}",
                        text=text)


def _find_fence(text: str, pos: int):
    hits = [(i, f) for f in FENCES if (i := text.find(f[0], pos)) >= 0]
    return min(hits, key=lambda h: h[0]) if hits else None


def parse_tool_calls(text: str, tools, *, allow_unclosed: bool = False) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a reply: each ```tool_call (or <tool_call>) block is a call; the
    content is the text outside them, stripped. A reply that is only a JSON object
    {"name": <a tool>, "arguments"|"parameters": {...}} is one call too. A block left open
    is a ToolCallError with `partial`, or with `allow_unclosed` part of the content."""
    names = [t.name for t in coerce_tools(tools)]
    content, calls, pos = [], [], 0
    while (hit := _find_fence(text, pos)) is not None:
        t, (opening, closer) = hit
        content.append(text[pos:t])
        found = _scan(text, t + len(opening), closer, names, len(calls) + 1)
        if found is None:
            if not allow_unclosed:
                raise ToolCallError(f"tool call {len(calls) + 1}: the {opening} block is not closed",
                                    text=text, partial=True)
            pos = t
            break
        calls.append(found[0])
        pos = found[1]
    content = ("".join(content) + text[pos:]).strip()
    if not calls and content.startswith("{"):
        try:
            fields, spans, end = _envelope(content, 0)
            if end == len(content) and fields.get("name") in names and {"arguments", "parameters"} & set(fields):
                return "", [_make_call(content, fields, spans, names, 1)]
        except (_Bad, ToolCallError):
            pass
    return content, calls


class ToolCallStream:
    """Parses a reply piece by piece. feed(piece) and finish() return events:
    ("content", text), held back only while it could begin a block; ("call_start", index,
    id, name) once the name is complete; ("call_args", index, fragment), whose concatenation
    is the call's arguments_json, each as soon as it arrives; ("call_end", index, ToolCall)
    when the block closes. A reply that is only a bare JSON call is content here."""

    def __init__(self, tools):
        self.names = [t.name for t in coerce_tools(tools)]
        self.calls: list[ToolCall] = []
        self.text = ""  # everything fed
        self.unclosed: str | None = None  # a block left open by finish(allow_unclosed=True)
        self._buf = ""  # outside a block: held content; inside: the text after the opening
        self._fence = None  # (opening, closer) inside a block

    def feed(self, piece: str) -> list[tuple]:
        self.text += piece
        self._buf += piece
        out: list[tuple] = []
        try:
            while self._step(out):
                pass
        except ToolCallError as e:
            raise ToolCallError(str(e), text=self.text) from None
        return out

    def _step(self, out: list) -> bool:
        """Emit what the buffer allows; True when a block opened or closed (step again)."""
        buf, k = self._buf, len(self.calls)
        if self._fence is None:
            if hit := _find_fence(buf, 0):
                out += [("content", buf[:hit[0]])] if hit[0] else []
                self._buf, self._fence = buf[hit[0] + len(hit[1][0]):], hit[1]
                self._id, self._name = new_call_id(), None
                self._args = self._sent = self._depth = self._in_str = self._esc = None
                return True
            hold = max((n for f, _ in FENCES for n in range(1, len(f)) if buf.endswith(f[:n])), default=0)
            if len(buf) > hold:
                out.append(("content", buf[:len(buf) - hold]))
                self._buf = buf[len(buf) - hold:]
            return False
        if self._name is None and (m := _HEAD.match(buf)) and m.group(1) in self.names:
            self._name = m.group(1)
            out.append(("call_start", k, self._id, self._name))
        if self._name and self._args is None and (m := _ARGS_HEAD.match(buf)):
            self._args, self._sent, self._depth, self._in_str, self._esc = m.end(), "", 0, False, False
        if self._args is not None and (self._depth or not self._sent):  # up to the arguments' closing brace
            i = start = self._args + len(self._sent)
            while i < len(buf) and (self._depth or i == start):
                c, i = buf[i], i + 1
                if self._in_str:
                    self._esc, self._in_str = (False, True) if self._esc else (c == "\\", c != '"')
                elif c == '"':
                    self._in_str = True
                elif c in "{[}]":
                    self._depth += 1 if c in "{[" else -1
            if i > start:
                out.append(("call_args", k, buf[start:i]))
                self._sent += buf[start:i]
        return self._close(out, k)

    def _close(self, out: list, k: int) -> bool:
        buf, closer = self._buf, self._fence[1]
        if closer not in buf or self._depth:  # (inside the arguments the block cannot close)
            return False
        try:
            _envelope(buf, 0)
        except _Bad:
            return False  # not complete yet (or malformed: finish() tells)
        found = _scan(buf, 0, closer, self.names, k + 1, self._id)
        if found is None:
            return False
        call, end = found
        out += [] if self._name else [("call_start", k, call.id, call.name)]
        sent = self._sent or ""
        if not call.arguments_json.startswith(sent):
            raise ToolCallError(f"tool call {k + 1}: the arguments differ from what was streamed")
        out += [("call_args", k, call.arguments_json[len(sent):])] if len(call.arguments_json) > len(sent) else []
        out.append(("call_end", k, call))
        self.calls.append(call)
        self._buf, self._fence = buf[end:], None
        return True

    def finish(self, allow_unclosed: bool = False) -> list[tuple]:
        """The held-back content. A block still open is a ToolCallError (`partial` when it is
        only unclosed); with `allow_unclosed` it is kept in `unclosed` (and given as content
        when nothing of it was streamed)."""
        if self._fence is None:
            out, self._buf = ([("content", self._buf)] if self._buf else []), ""
            return out
        k, raw = len(self.calls) + 1, self._fence[0] + self._buf
        try:
            _scan(self._buf, 0, self._fence[1], self.names, k)
        except ToolCallError as e:
            raise ToolCallError(str(e), text=self.text) from None
        if not allow_unclosed:
            raise ToolCallError(f"tool call {k}: the {self._fence[0]} block is not closed",
                                text=self.text, partial=True)
        self.unclosed, self._buf, self._fence = raw, "", None
        return [] if self._name else [("content", raw)]


def run_tool(tool: Tool, call: ToolCall) -> str:
    """Run `call` with `tool.fn`; the result as text for the model (a string as it is, else
    JSON). An exception is returned as "error: <Type>: <message>", for the model to see."""
    if tool.fn is None:
        raise BadInputError(f"the tool {tool.name!r} has no function to run")
    if call.name != tool.name:
        raise BadInputError(f"the call is to {call.name!r}, not to the tool {tool.name!r}")
    try:
        result = tool.fn(**call.arguments)
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, default=str, ensure_ascii=False)
