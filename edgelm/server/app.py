"""The OpenAI-compatible HTTP server (Starlette on uvicorn) and the web chat page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import math
import time
import uuid
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import BadInputError
from ..runtime.conversation import render_chat, render_chat_spans
from ..runtime.modelinfo import BASE_MODEL_NOTICE, is_instruction_tuned
from ..runtime.sampler import SamplerConfig
from ..runtime.tools import ToolCallError, ToolCallStream, parse_tool_calls
from .protocol import (MAX_JSON_DEPTH, ApiError, GenParams, bad, check_json_tree, check_model, model_not_found,
                       parse_common, parse_messages, parse_prompt, parse_tools)
from .metrics import Metrics
from .scheduler import Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB


def default_max_body(engine) -> int:
    """The body limit when none is given: 1 MiB, or 32 MiB for a bundle that takes images or
    audio (sent as base64)."""
    multimodal = any(getattr(engine.config, k, None) is not None for k in ("vision", "audio"))
    return (32 if multimodal else 1) << 20
DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds for a request's head, and again for its body
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ClientGone(Exception):
    pass


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    if e.status in (408, 413):  # the rest of the body may still be coming: do not reuse the connection
        headers = {"Connection": "close"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def _next_event(jobs: list[Job], listener: asyncio.Future):
    """The request's next (index, kind, value) from any of its jobs (they share one queue);
    raises ClientGone (and cancels every job) on disconnect."""
    get = asyncio.ensure_future(jobs[0].events.get())
    done, _ = await asyncio.wait({get, listener}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    _cancel_all(jobs)
    raise ClientGone()


def _cancel_all(jobs: list[Job]) -> None:
    for j in jobs:
        if not j.done:
            j.cancel.set()


def _finish_reason(stats) -> str:
    if stats is None:
        return "stop"
    return "length" if stats.stop_reason == "max_new_tokens" else "stop"


def _usage(jobs: list[Job], stats: dict) -> dict:
    """Usage over a request's choices: the prompt counted once, every choice's tokens."""
    n_prompt = len(jobs[0].ids)
    done = sum(st.generated_tokens for st in stats.values() if st is not None)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": done,
        "total_tokens": n_prompt + done,
        # the first choice's: its prompt tokens whose KV came from an earlier request
        "prompt_tokens_details": {"cached_tokens": jobs[0].cached_tokens},
    }


def _token_text(tok, i: int) -> tuple[str, list[int]]:
    b = tok.token_bytes(i)
    return b.decode("utf-8", errors="replace"), list(b)


def _chat_logprobs(tok, lps) -> list[dict]:
    """OpenAI chat logprobs entries for TokenLogprobs."""
    out = []
    for lp in lps:
        text, b = _token_text(tok, lp.token)
        top = []
        for i, v in lp.top:
            t, tb = _token_text(tok, i)
            top.append({"token": t, "logprob": v, "bytes": tb})
        out.append({"token": text, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
    return out


def _completion_logprobs(tok, lps, offset: int) -> dict:
    """The legacy completions logprobs object; `offset` is the text offset of the first token."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = _token_text(tok, lp.token)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tok, i)[0]: v for i, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _timings(stats) -> dict | None:
    if stats is None:
        return None
    return {
        "prefilled_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "prefill_tok_s": round(stats.prefill_tok_s, 2),
        "decode_tok_s": round(stats.decode_tok_s, 2),
        "ttft_s": round(stats.ttft_seconds, 4),
        "stop_reason": stats.stop_reason,
    }


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize",
          "/metrics", "/health", "/")


class CountRequests:
    """ASGI middleware: counts every HTTP response by route and status code."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        seen = {}

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.requests.labels(route, str(seen.get("status", 499))).inc()


class SSEResponse(Response):
    """Streams a job as server-sent events; a client that disconnects cancels the job."""

    media_type = "text/event-stream"

    def __init__(self, jobs: list[Job], chunks, headers: dict | None = None):
        self.jobs = jobs
        self.chunks = chunks  # callable(index, kind, value) -> list[dict] of events to send
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        jobs = self.jobs
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for j in jobs:
                for ev in self.chunks(j.index, "start", None):
                    await self._send(send, ev)
            left = len(jobs)
            while left:
                index, kind, value = await _next_event(jobs, listener)
                for ev in self.chunks(index, kind, value):
                    await self._send(send, ev)
                if kind == "error":
                    break
                left -= kind == "done"
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            listener.cancel()
            _cancel_all(jobs)

    @staticmethod
    async def _send(send, ev: dict) -> None:
        data = b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})


def create_app(engine, *, api_key: str | None = None, max_queue: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY,
               model_name: str | None = None, pool_size: int = 2, prefix_cache_bytes: int = 0,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT, parallel: int = 1,
               allow_local_files: bool = False) -> Starlette:
    """The ASGI app. `engine` is an edgelm Engine; generation runs in one worker thread.

    allow_local_files: whether an image_url part may name a file on the server's disk (off:
    clients send images and audio as data: URLs / base64).

    prefix_cache_bytes: past the `pool_size` idle sessions, keep more (least recently used
    dropped first) while their KV takes at most this many bytes, so that more prompt
    prefixes (system prompts, conversations) are reused; 0 keeps the pool alone.

    request_timeout: seconds a client has to send a request's head (enforced by the server,
    see edgelm.server.connection) and then again its body (enforced here); past it, 408."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= 64:
        raise BadInputError(f"parallel must be an integer in [1, 64], got {parallel!r}")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise BadInputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if (isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float))
            or not math.isfinite(request_timeout) or request_timeout <= 0):
        raise BadInputError(f"request_timeout must be a number of seconds > 0, got {request_timeout!r}")
    name = model_name or engine.path.name.removesuffix(".edgelm")
    created = int(time.time())
    metrics = Metrics(lambda: scheduler.stats())
    scheduler = Scheduler(engine, max_queue=max_queue, pool_size=pool_size, on_done=metrics.job_done,
                          parallel=parallel, prefix_cache_bytes=prefix_cache_bytes)
    tuned = is_instruction_tuned(getattr(getattr(engine, "bundle", None), "header", None))
    # chat with a base model works but rambles: say so on every chat response
    chat_headers = {"X-Edgelm-Notice": BASE_MODEL_NOTICE} if tuned is False else {}

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "edgelm",
                "context_length": engine.max_tokens, "instruction_tuned": tuned}

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme name is case-insensitive (RFC 7235); the key is compared exactly
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY')", None,
                           "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_body_bytes:
                raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes", None,
                               "request_too_large")
        return bytes(buf)

    async def read_json(request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None:  # (the HTTP layer has already rejected a malformed one)
            try:
                if int(cl) > max_body_bytes:
                    raise ApiError(413, f"the request body is larger than {max_body_bytes} bytes", None,
                                   "request_too_large")
            except ValueError:
                raise bad("invalid Content-Length header") from None
        try:
            raw = await asyncio.wait_for(read_body(request), request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {request_timeout:g} s "
                                f"(--request-timeout)", None, "request_timeout") from None
        try:
            body = json.loads(raw)
        except RecursionError:
            raise bad(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep", None,
                      "invalid_json") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object", None, "invalid_json")
        check_json_tree(body)
        return body

    def make_jobs(ids: list[int], p: GenParams, default_max: int | None, param: str, constraint=None,
                  request_id: str = "", spans=()) -> list[Job]:
        """The request's n jobs (one per choice, sharing one event queue), queued together."""
        cap = engine.max_tokens
        if len(ids) >= cap:
            raise bad(f"This model's maximum context length is {cap} tokens, but the prompt has {len(ids)} tokens",
                      param, "context_length_exceeded")
        room = cap - len(ids)
        max_new = p.max_tokens if p.max_tokens is not None else min(default_max or room, room)
        if max_new > room:
            raise bad(f"This model's maximum context length is {cap} tokens; the prompt has {len(ids)} tokens and "
                      f"max_tokens asks for {max_new} more (at most {room} fit)", "max_tokens",
                      "context_length_exceeded")
        d = engine.default_sampler
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for i in range(p.n):
            try:
                sampler = SamplerConfig(
                    temperature=d.temperature if p.temperature is None else p.temperature,
                    top_p=d.top_p if p.top_p is None else p.top_p,
                    top_k=d.top_k if p.top_k is None else p.top_k,
                    # choice i of a seeded request draws from seed + i: reproducible, not identical
                    seed=None if p.seed is None else (p.seed + i) % (2 ** 63),
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    repetition_penalty=p.repetition_penalty,
                )
            except BadInputError as e:
                raise bad(str(e)) from None
            jobs.append(Job(ids=ids, sampler=sampler, max_new_tokens=max_new, stop=p.stop, loop=loop,
                            events=events, index=i, constraint=constraint, logprobs=p.logprobs,
                            request_id=request_id, spans=list(spans)))
        try:
            scheduler.submit(jobs)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", None, "queue_full", type="rate_limit_error") from None
        return jobs

    async def build_constraint(spec: dict | None, param: str = "response_format"):
        """A Constraint for a response_format spec. The first one builds the model's vocabulary
        for the grammar engine (about a second): off the event loop."""
        if spec is None:
            return None
        from ..runtime.constrained import Constraint

        try:
            return await asyncio.to_thread(Constraint, engine, **spec)
        except BadInputError as e:
            raise bad(f"{param}: {e}", param, "invalid_value") from None

    async def tool_constraint(tools, choice: str):
        """What keeps a call well formed: with "auto" a grammar that starts once the reply opens
        a ```tool_call block; with "required" or a named function, the whole reply is one call."""
        from ..runtime.constrained import Constraint, Triggered, vocabulary
        from ..runtime.tools import TRIGGER, call_grammar

        def build():
            vocab = vocabulary(engine)
            for text in (TRIGGER + "\n", "\n```"):
                if not vocab.can_spell(text):
                    raise BadInputError(f"this model's vocabulary cannot write {text!r}, which the tool-call "
                                        f"format needs")
            if choice == "auto":
                return Triggered(TRIGGER, Constraint(engine, lark=call_grammar(tools, fenced=False)))
            return Constraint(engine, lark=call_grammar(tools, fenced=True, name=None if choice == "required" else choice))

        try:
            return await asyncio.to_thread(build)
        except BadInputError as e:
            raise bad(f"tools: {e}", "tools", "invalid_value") from None

    async def collect(request: Request, jobs: list[Job]):
        """Every choice's (text, logprobs, stats), by index."""
        listener = asyncio.ensure_future(_wait_disconnect(request.receive))
        texts = {j.index: [] for j in jobs}
        lps = {j.index: [] for j in jobs}
        stats = {}
        try:
            while len(stats) < len(jobs):
                index, kind, value = await _next_event(jobs, listener)
                if kind == "piece":
                    texts[index].append(value[0])
                    lps[index] += value[1]
                elif kind == "error":
                    if isinstance(value, BadInputError):  # e.g. a grammar the vocabulary cannot finish
                        raise bad(f"the request cannot be completed: {value}", None, "invalid_value")
                    raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", None, None,
                                   type="server_error")
                else:
                    stats[index] = value
            return {i: ("".join(texts[i]), lps[i], stats[i]) for i in texts}
        finally:
            listener.cancel()
            _cancel_all(jobs)

    def error_event(value) -> dict:
        return {"error": ApiError(500, f"generation failed: {value}", type="server_error").body()["error"]}

    # ------------------------------------------------------------------ endpoints

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": name, **scheduler.stats()})

    async def models(request: Request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request):
        check_auth(request)
        if request.path_params["model"] != name:
            raise model_not_found(request.path_params["model"], name)
        return JSONResponse(model_card())

    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        p = parse_common(body)
        messages = parse_messages(body, allow_files=allow_local_files)
        tools, tool_choice = parse_tools(body)
        check_model(body, name)  # (after the request's shape: a malformed request is a 400 whatever its model)
        spans: list = []
        try:
            if any(not isinstance(m["content"], str) for m in messages):
                # images / audio: the towers run off the event loop (under the engine's lock)
                ids, spans = await asyncio.to_thread(render_chat_spans, engine, messages, True, tools)
            else:
                _, ids = render_chat(engine, messages, add_generation_prompt=True, tools=tools)
        except BadInputError as e:
            raise bad(str(e), "messages", "invalid_value") from None
        calling = tools is not None and tool_choice != "none"
        if calling and p.constraint is not None:
            raise bad("'response_format' cannot be combined with 'tools' unless 'tool_choice' is 'none'",
                      "response_format", "unsupported_value")
        constraint = await (tool_constraint(tools, tool_choice) if calling else build_constraint(p.constraint))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        jobs = make_jobs(ids, p, None, "messages", constraint, cid, spans)
        now = int(time.time())
        tok = engine.tokenizer

        def chunk(index: int, delta: dict, finish=None, logprobs=None, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                    **extra}

        def bad_call(e: ToolCallError) -> ApiError:
            return ApiError(500, f"the model's reply holds a malformed tool call: {e}", None, "invalid_tool_call",
                            type="server_error")

        if p.stream:
            stats: dict = {}
            parsers = {j.index: ToolCallStream(tools) for j in jobs} if calling else {}

            def deltas(index: int, evs) -> list[dict]:
                out = []
                for ev in evs:
                    if ev[0] == "content":
                        out.append({"content": ev[1]})
                    elif ev[0] == "call_start":
                        _, k, call_id, fname = ev
                        out.append({"tool_calls": [{"index": k, "id": call_id, "type": "function",
                                                    "function": {"name": fname, "arguments": ""}}]})
                    elif ev[0] == "call_args":
                        out.append({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
                return out

            def events(index, kind, value):
                if kind == "start":
                    return [chunk(index, {"role": "assistant", "content": ""})]
                if kind == "piece":
                    text, lps = value
                    lp = {"content": _chat_logprobs(tok, lps), "refusal": None} if p.logprobs is not None else None
                    if index not in parsers:
                        return [chunk(index, {"content": text}, logprobs=lp)]
                    try:
                        ds = deltas(index, parsers[index].feed(text))
                    except ToolCallError as e:
                        return [{"error": bad_call(e).body()["error"]}]
                    if lp is not None and not ds:
                        ds = [{}]
                    return [chunk(index, d, logprobs=lp if k == 0 else None) for k, d in enumerate(ds)]
                if kind == "error":
                    return [error_event(value)]
                stats[index] = value
                finish = _finish_reason(value)
                out = []
                if index in parsers:
                    ps = parsers[index]
                    try:
                        out = [chunk(index, d) for d in deltas(index, ps.finish(allow_unclosed=finish == "length"))]
                    except ToolCallError as e:
                        return [{"error": bad_call(e).body()["error"]}]
                    if ps.calls and finish == "stop":
                        finish = "tool_calls"
                out.append(chunk(index, {}, finish, timings=_timings(value)))
                if p.include_usage and len(stats) == len(jobs):
                    out.append({"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                                "system_fingerprint": None, "choices": [], "usage": _usage(jobs, stats),
                                "timings": _timings(stats.get(0))})
                return out
            return SSEResponse(jobs, events, chat_headers)
        try:
            results = await collect(request, jobs)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, (text, lps, st) in sorted(results.items()):
            lp = {"content": _chat_logprobs(tok, lps), "refusal": None} if p.logprobs is not None else None
            message = {"role": "assistant", "content": text}
            finish = _finish_reason(st)
            if calling:
                try:
                    content, calls = parse_tool_calls(text, tools, allow_unclosed=finish == "length")
                except ToolCallError as e:
                    raise bad_call(e) from None
                if calls:
                    message = {"role": "assistant", "content": content or None,
                               "tool_calls": [c.to_openai() for c in calls]}
                    finish = "tool_calls" if finish == "stop" else finish
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": now, "model": name, "system_fingerprint": None,
            "choices": choices, "usage": _usage(jobs, {i: r[2] for i, r in results.items()}),
            "timings": _timings(results[0][2]),
        }, headers=chat_headers)

    async def completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        p = parse_common(body, chat=False)
        if body.get("echo"):
            raise bad("echo is not supported", "echo", "unsupported_parameter")
        if body.get("suffix"):
            raise bad("suffix is not supported", "suffix", "unsupported_parameter")
        prompt = parse_prompt(body, engine.config.vocab_size)
        check_model(body, name)
        ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise bad("'prompt' is empty", "prompt", "invalid_value")
        constraint = await build_constraint(p.constraint)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        jobs = make_jobs(ids, p, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt", constraint, cid)
        now = int(time.time())
        tok = engine.tokenizer

        def chunk(index: int, text: str, finish=None, logprobs=None, **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                    **extra}

        if p.stream:
            stats: dict = {}
            offsets = {j.index: 0 for j in jobs}

            def events(index, kind, value):
                if kind == "start":
                    return []
                if kind == "piece":
                    text, lps = value
                    lp = None
                    if p.logprobs is not None:
                        lp = _completion_logprobs(tok, lps, offsets[index])
                    offsets[index] += len(text)
                    return [chunk(index, text, logprobs=lp)]
                if kind == "error":
                    return [error_event(value)]
                stats[index] = value
                out = [chunk(index, "", _finish_reason(value), timings=_timings(value))]
                if p.include_usage and len(stats) == len(jobs):
                    out.append({"id": cid, "object": "text_completion", "created": now, "model": name,
                                "choices": [], "usage": _usage(jobs, stats)})
                return out
            return SSEResponse(jobs, events)
        try:
            results = await collect(request, jobs)
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, (text, lps, st) in sorted(results.items()):
            lp = _completion_logprobs(tok, lps, 0) if p.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": _finish_reason(st)})
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": now, "model": name, "system_fingerprint": None,
            "choices": choices, "usage": _usage(jobs, {i: r[2] for i, r in results.items()}),
            "timings": _timings(results[0][2]),
        })

    async def tokenize(request: Request):
        """llama.cpp's /tokenize: {"content": str, "add_special": bool, "with_pieces": bool}."""
        check_auth(request)
        body = await read_json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise bad("'content' must be a string", "content", "invalid_type")
        add_special = body.get("add_special", False)
        with_pieces = body.get("with_pieces", False)
        for k, v in (("add_special", add_special), ("with_pieces", with_pieces)):
            if not isinstance(v, bool):
                raise bad(f"'{k}' must be a boolean", k, "invalid_type")
        try:
            ids = engine.tokenize(content, add_bos=add_special and engine.add_bos)
        except BadInputError as e:
            raise bad(str(e), "content", "invalid_value") from None
        if not with_pieces:
            return JSONResponse({"tokens": ids})
        tok = engine.tokenizer
        pieces = []
        for i in ids:
            b = tok.token_bytes(i)
            try:
                piece = b.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(b)  # a byte-fallback piece: its bytes
            pieces.append({"id": i, "piece": piece})
        return JSONResponse({"tokens": pieces})

    async def detokenize(request: Request):
        """llama.cpp's /detokenize: {"tokens": [ids]} -> {"content": str}."""
        check_auth(request)
        body = await read_json(request)
        toks = body.get("tokens")
        if not isinstance(toks, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in toks):
            raise bad("'tokens' must be an array of token ids", "tokens", "invalid_type")
        try:
            return JSONResponse({"content": engine.detokenize(toks)})
        except BadInputError as e:
            raise bad(str(e), "tokens", "invalid_value") from None

    async def embeddings(request: Request):
        """OpenAI /v1/embeddings over the model's hidden states (Engine.embeddings)."""
        check_auth(request)
        body = await read_json(request)
        inputs = body.get("input")
        vocab = engine.config.vocab_size
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(
                isinstance(i, int) and not isinstance(i, bool) for i in inputs)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            raise bad("'input' must be a string, an array of strings, or token ids", "input",
                      "missing_required_parameter" if inputs is None else "invalid_type")
        if len(inputs) > 256:
            raise bad("'input' takes at most 256 items", "input", "invalid_value")
        for j, item in enumerate(inputs):
            if isinstance(item, str):
                if not item:
                    raise bad(f"input[{j}] is empty", f"input[{j}]", "invalid_value")
            elif isinstance(item, list) and item and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
                if any(not 0 <= i < vocab for i in item):
                    raise bad(f"token ids in input[{j}] must be in [0, {vocab})", f"input[{j}]", "invalid_value")
            else:
                raise bad(f"input[{j}] must be a non-empty string or array of token ids", f"input[{j}]",
                          "invalid_type")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad("'encoding_format' must be 'float' or 'base64'", "encoding_format", "invalid_value")
        pooling = body.get("pooling", "mean")  # extension: "mean" or "last"
        if pooling not in ("mean", "last"):
            raise bad("'pooling' must be 'mean' or 'last'", "pooling", "invalid_value")
        dims = body.get("dimensions")
        hidden = engine.config.hidden_size
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= hidden):
            raise bad(f"'dimensions' must be an integer in [1, {hidden}]", "dimensions", "invalid_value")
        check_model(body, name)
        ids = [engine.tokenize(x, add_bos=engine.add_bos) if isinstance(x, str) else x for x in inputs]
        for j, x in enumerate(ids):
            if len(x) > engine.max_tokens:
                raise bad(f"input[{j}] has {len(x)} tokens; this server's context is {engine.max_tokens}",
                          f"input[{j}]", "context_length_exceeded")
        # unnormalized, so that a `dimensions` cut is normalized after the cut
        vecs = await asyncio.to_thread(engine.embeddings, ids, pooling, False)
        if dims is not None:
            vecs = vecs[:, :dims]
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = (vecs / np.where(norms > 0, norms, 1)).astype(np.float32)
        n_tok = sum(len(x) for x in ids)
        metrics.embedded_tokens.inc(n_tok)
        data = []
        for j, v in enumerate(vecs):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64" else v.tolist()
            data.append({"object": "embedding", "index": j, "embedding": emb})
        return JSONResponse({"object": "list", "data": data, "model": name,
                             "usage": {"prompt_tokens": n_tok, "total_tokens": n_tok}})

    async def metrics_route(request: Request):
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ errors

    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = exc.detail if exc.status_code != 404 else f"no route for {request.method} {request.url.path}"
        return _error_response(ApiError(exc.status_code, str(msg), None, code))

    async def internal_error(request: Request, exc: Exception):
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, None,
                                        type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            scheduler.stop()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CountRequests, metrics=metrics)],
                    exception_handlers={
        ApiError: api_error, HTTPException: http_error, Exception: internal_error,
    })
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.model_name = name
    app.state.instruction_tuned = tuned
    app.state.request_timeout = float(request_timeout)
    return app
