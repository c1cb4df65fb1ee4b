"""OpenAI request validation and response shapes."""

from __future__ import annotations

import math
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


def parse_common(body: dict) -> GenParams:
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise bad("'n' must be an integer", "n", "invalid_type")
        if n != 1:
            raise bad("only n=1 is supported", "n", "unsupported_value")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad("only best_of=1 is supported", "best_of", "unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise bad("logprobs are not supported", "logprobs", "unsupported_value")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise bad(f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("only response_format {\"type\": \"text\"} is supported", "response_format", "unsupported_value")

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
    )


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{p} must be an object", p, "invalid_type")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"{p}.role must be 'system', 'user' or 'assistant', got {role!r}", f"{p}.role", "invalid_value")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{p}.content[{j}]: only text content parts are supported", f"{p}.content",
                              "unsupported_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{p}.content must be a string or an array of text parts", f"{p}.content", "invalid_type")
        out.append({"role": role, "content": content})
    return out


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
