"""OpenAI request validation and response shapes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_STOP = 4
MAX_JSON_DEPTH = 64  # OpenAI request bodies nest about 5 deep


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _check_unicode(s: str, where: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{where} a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode", path or None,
                  "invalid_value") from None


def check_json_tree(body) -> None:
    """Reject what json.loads lets through but nothing downstream can use: nesting deeper than
    MAX_JSON_DEPTH, and strings holding lone UTF-16 surrogates (a "\\ud800" escape, or the same
    code point sent as bytes), which cannot be encoded as UTF-8. The error names the field."""
    stack = [(body, "", 0)]  # iterative: a recursive walk is what the depth limit protects against
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, f"{path or 'the body'} contains", path)
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            raise bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", None, "invalid_json")
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        for key, child in reversed(items):  # reversed: the first bad field is the one reported
            if isinstance(key, str):
                _check_unicode(key, f"an object key in {path or 'the body'} contains", path)
            stack.append((child, _join(path, key), depth + 1))


def check_model(body: dict, served: str) -> None:
    """`model` may be omitted (or null); otherwise it must be the served model's id."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    if model != served:
        raise model_not_found(model, served)


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist; this server serves '{served}' (GET /v1/models)",
                    "model", "model_not_found")


@dataclass
class GenParams:
    temperature: float | None
    top_p: float | None
    top_k: int | None
    max_tokens: int | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    n: int = 1
    logprobs: int | None = None  # None: off; else alternatives per token
    constraint: dict | None = None  # a Constraint spec from response_format


def _num(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"'{name}' must be in {interval}, got {v}", name, "invalid_value")
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{name}' must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                  + f", got {v}", name, "invalid_value")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean", name, "invalid_type")
    return v


MAX_N = 8  # choices per request; each is its own generation in the queue's worker
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit


def parse_response_format(body: dict):
    """`response_format` as a constraint spec for runtime.constrained.Constraint: None for
    text, {"json_object": True}, {"json_schema": schema}, or (extensions) {"regex": ...} and
    {"lark": ...}. Compiling the grammar is the caller's (it needs the model's vocabulary)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad("'response_format' must be an object", "response_format", "invalid_type")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = rf.get("schema")  # llama.cpp's extension: a schema inside json_object
        if schema is None:
            return {"json_object": True}
        if not isinstance(schema, (dict, bool)):
            raise bad("'response_format.schema' must be a JSON Schema object", "response_format.schema",
                      "invalid_type")
        return {"json_schema": schema}
    if kind == "json_schema":
        js = rf.get("json_schema")
        where = "response_format.json_schema"
        if not isinstance(js, dict):
            raise bad(f"'{where}' must be an object with 'name' and 'schema'", where,
                      "missing_required_parameter" if js is None else "invalid_type")
        name = js.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise bad(f"'{where}.name' must be 1-64 letters, digits, '_' or '-', got {name!r}", f"{where}.name",
                      "invalid_value")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad(f"'{where}.strict' must be a boolean", f"{where}.strict", "invalid_type")
        schema = js.get("schema", True)  # no schema: any JSON value
        if not isinstance(schema, (dict, bool)):
            raise bad(f"'{where}.schema' must be a JSON Schema object", f"{where}.schema", "invalid_type")
        return {"json_schema": schema}
    if kind in ("regex", "grammar"):  # extensions: {"type": "regex", "regex": "..."}, {"type": "grammar", "grammar": lark}
        src = rf.get(kind)
        if not isinstance(src, str) or not src:
            raise bad(f"'response_format.{kind}' must be a non-empty string", f"response_format.{kind}",
                      "invalid_type")
        return {"regex": src} if kind == "regex" else {"lark": src}
    raise bad(f"'response_format.type' must be 'text', 'json_object', 'json_schema', 'regex' or 'grammar', "
              f"got {kind!r}", "response_format.type", "invalid_value")


def parse_common(body: dict, chat: bool = True) -> GenParams:
    n = _int(body, "n", 1, MAX_N)
    n = 1 if n is None else n
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (it must be absent or equal to n)", "best_of", "unsupported_value")
    if chat:
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:  # completions: logprobs is the number of alternatives (0-5)
        if isinstance(body.get("logprobs"), bool):
            raise bad("'logprobs' must be an integer (alternatives per token) for completions", "logprobs",
                      "invalid_type")
        logprobs = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise bad(f"'{name}' is deprecated by OpenAI and not supported: use 'tools' and 'tool_choice'", name,
                      "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    constraint = parse_response_format(body)

    max_tokens = _int(body, "max_tokens", 1)
    mct = _int(body, "max_completion_tokens", 1)
    if mct is not None:
        max_tokens = mct if max_tokens is None else min(max_tokens, mct)

    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} sequences", "stop", "invalid_value")
    if any(not s for s in stops):
        raise bad("'stop' sequences must not be empty", "stop", "invalid_value")

    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad("'seed' must be an integer", "seed", "invalid_type")
        seed = seed % (2 ** 63)  # OpenAI accepts negative seeds; numpy wants >= 0

    stream = _bool(body, "stream")
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
        include_usage = _bool(so, "include_usage")

    return GenParams(
        temperature=_num(body, "temperature", 0.0, 2.0),
        top_p=_num(body, "top_p", 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", 0),
        max_tokens=max_tokens,
        stop=stops,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        presence_penalty=_num(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_num(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repetition_penalty=_num(body, "repetition_penalty", 0.0, 10.0, lo_open=True) or 1.0,
        n=n,
        logprobs=logprobs,
        constraint=constraint,
    )


MEDIA_TYPES = ("image_url", "image", "input_audio", "audio")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


def _media_part(part: dict, where: str, allow_files: bool):
    """An OpenAI image_url / input_audio part (or a Hugging Face image / audio one) as an
    Image / Audio part holding the decoded bytes or an allowed local path."""
    from ..errors import BadInputError
    from ..runtime.content import Audio, Image
    from ..runtime.media import read_source

    kind = part["type"]
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise bad(f"{where}.input_audio must be an object with 'data' (base64 audio) and 'format'", where,
                      "invalid_value")
        fmt = spec.get("format")
        if fmt is not None and fmt not in AUDIO_FORMATS:
            raise bad(f"{where}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}", where,
                      "invalid_value")
        src = "data:audio/x;base64," + spec["data"]
    else:
        src = part.get(kind)
        if kind == "image_url" and isinstance(src, dict):
            src = src.get("url")
        src = src if src is not None else part.get("url", part.get("path"))
        if not isinstance(src, str):
            raise bad(f"{where}: an {kind} part needs a URL string (a data: URL, or a local file path where the "
                      f"server allows them)", where, "invalid_value")
    try:
        data, _ = read_source(src, where, allow_files=allow_files)
    except BadInputError as e:
        raise bad(str(e), where, "invalid_value") from None
    return Image(data) if kind.startswith("image") else Audio(data)


def _content(content, p: str, allow_files: bool = False):
    """A message's content: a string, or (where it holds images or audio) a list of str and
    Image / Audio parts."""
    if isinstance(content, list):  # content parts
        items: list = []
        for j, part in enumerate(content):
            where = f"{p}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                items.append(part["text"])
            elif kind in MEDIA_TYPES:
                items.append(_media_part(part, where, allow_files))
            else:
                raise bad(f"{where}: content parts must be text, image_url or input_audio", f"{p}.content",
                          "unsupported_value")
        if all(isinstance(it, str) for it in items):
            return "".join(items)
        return items
    if not isinstance(content, str):
        raise bad(f"{p}.content must be a string or an array of content parts", f"{p}.content", "invalid_type")
    return content


def parse_messages(body: dict, allow_files: bool = False) -> list[dict]:
    """The request's messages; a user message's content may hold image and audio parts
    (decoded from data: URLs; local file paths only with allow_files)."""
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_value")
    out = []
    call_ids: set = set()
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{p}.role must be 'system', 'user', 'assistant' or 'tool', got {role!r}", f"{p}.role",
                      "invalid_value")
        content = m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and role == "assistant":
            content = ""
        msg = {"role": role, "content": _content(content, p, allow_files)}
        if role != "user" and not isinstance(msg["content"], str):
            raise bad(f"{p}: only user messages may hold images or audio", f"{p}.content", "unsupported_value")
        if calls:
            if not isinstance(calls, list):
                raise bad(f"{p}.tool_calls must be an array", f"{p}.tool_calls", "invalid_type")
            for j, c in enumerate(calls):
                q = f"{p}.tool_calls[{j}]"
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    raise bad(f"{q}.function must be an object with a 'name'", f"{q}.function", "invalid_value")
                if not isinstance(c.get("id", ""), str):
                    raise bad(f"{q}.id must be a string", f"{q}.id", "invalid_type")
                call_ids.add(c.get("id"))
            msg["tool_calls"] = calls
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise bad(f"{p}.tool_call_id is required for a tool message (the id of the call it answers)",
                          f"{p}.tool_call_id", "missing_required_parameter" if cid is None else "invalid_type")
            if cid not in call_ids:
                raise bad(f"{p}.tool_call_id {cid!r} matches no tool call of an earlier assistant message",
                          f"{p}.tool_call_id", "invalid_value")
            msg["tool_call_id"] = cid
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        out.append(msg)
    return out


TOOL_CHOICES = ("auto", "none", "required")


def parse_tools(body: dict):
    """(tools, tool_choice): the declared tools as runtime.tools.Tool (None when there are
    none), and "auto", "none", "required" or the name of the one function to call."""
    from ..errors import BadInputError
    from ..runtime.tools import coerce_tools

    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise bad("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}", "tools",
                  "invalid_type")
    for i, t in enumerate(raw or []):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad(f"tools[{i}].type must be 'function'", f"tools[{i}]", "invalid_value")
        if not isinstance(t.get("function"), dict):
            raise bad(f"tools[{i}].function must be an object with 'name', 'description' and 'parameters'",
                      f"tools[{i}].function", "invalid_value")
    try:
        tools = coerce_tools(raw) or None
    except BadInputError as e:
        field = re.match(r"(tools\[\d+\][.\w]*)", str(e))
        raise bad(str(e), field.group(1) if field else "tools", "invalid_value") from None
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        f = choice.get("function")
        if choice.get("type") != "function" or not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}", "tool_choice", "invalid_value")
        choice = f["name"]
        if not tools or choice not in {t.name for t in tools}:
            known = ", ".join(t.name for t in tools or []) or "none"
            raise bad(f"'tool_choice' names the function {choice!r}, which is not in 'tools' (declared: {known})",
                      "tool_choice", "invalid_value")
    elif choice not in TOOL_CHOICES:
        raise bad(f"'tool_choice' must be 'auto', 'none', 'required' or a named function, got {choice!r}",
                  "tool_choice", "invalid_value")
    if choice == "required" and not tools:
        raise bad("'tool_choice' is 'required' but no 'tools' are declared", "tool_choice", "invalid_value")
    ptc = body.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        raise bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    return tools, choice


def parse_prompt(body: dict, vocab: int):
    """A completion prompt: a string, a one-string list, or a list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        if any(not 0 <= i < vocab for i in prompt):
            raise bad(f"token ids in 'prompt' must be in [0, {vocab})", "prompt", "invalid_value")
        return list(prompt)
    raise bad("'prompt' must be a string, a one-string array or an array of token ids (batches are not "
              "supported)", "prompt", "invalid_value")
