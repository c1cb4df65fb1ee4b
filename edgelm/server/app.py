"""The OpenAI-compatible HTTP server (Starlette on uvicorn) and the web chat page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import BadInputError
from ..runtime.conversation import render_chat
from ..runtime.modelinfo import BASE_MODEL_NOTICE, is_instruction_tuned
from ..runtime.sampler import SamplerConfig
from .protocol import (MAX_JSON_DEPTH, ApiError, GenParams, bad, check_json_tree, check_model, model_not_found,
                       parse_common, parse_messages, parse_prompt)
from .scheduler import Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
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


async def _next_event(job: Job, listener: asyncio.Future):
    """The job's next (kind, value); raises ClientGone (and cancels the job) on disconnect."""
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, listener}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    job.cancel.set()
    raise ClientGone()


def _finish_reason(stats) -> str:
    if stats is None:
        return "stop"
    return "length" if stats.stop_reason == "max_new_tokens" else "stop"


def _usage(job: Job, stats) -> dict:
    done = stats.generated_tokens if stats else 0
    prefilled = stats.prompt_tokens if stats else 0
    return {
        "prompt_tokens": len(job.ids),
        "completion_tokens": done,
        "total_tokens": len(job.ids) + done,
        "prompt_tokens_details": {"cached_tokens": max(len(job.ids) - prefilled, 0)},
    }


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


class SSEResponse(Response):
    """Streams a job as server-sent events; a client that disconnects cancels the job."""

    media_type = "text/event-stream"

    def __init__(self, job: Job, chunks, headers: dict | None = None):
        self.job = job
        self.chunks = chunks  # callable(kind, value) -> list[dict] of events to send
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        job = self.job
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            for ev in self.chunks("start", None):
                await self._send(send, ev)
            while True:
                kind, value = await _next_event(job, listener)
                for ev in self.chunks(kind, value):
                    await self._send(send, ev)
                if kind in ("done", "error"):
                    break
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except (ClientGone, OSError):
            job.cancel.set()
        finally:
            listener.cancel()
            if not job.done:
                job.cancel.set()

    @staticmethod
    async def _send(send, ev: dict) -> None:
        data = b"data: " + json.dumps(ev, ensure_ascii=False).encode("utf-8") + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})


def create_app(engine, *, api_key: str | None = None, max_queue: int = 16, max_body_bytes: int = DEFAULT_MAX_BODY,
               model_name: str | None = None, pool_size: int = 2,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Starlette:
    """The ASGI app. `engine` is an edgelm Engine; generation runs in one worker thread.

    request_timeout: seconds a client has to send a request's head (enforced by the server,
    see edgelm.server.connection) and then again its body (enforced here); past it, 408."""
    if not isinstance(max_queue, int) or max_queue < 0:
        raise BadInputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if (isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float))
            or not math.isfinite(request_timeout) or request_timeout <= 0):
        raise BadInputError(f"request_timeout must be a number of seconds > 0, got {request_timeout!r}")
    name = model_name or engine.path.name.removesuffix(".edgelm")
    created = int(time.time())
    scheduler = Scheduler(engine, max_queue=max_queue, pool_size=pool_size)
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

    def make_job(ids: list[int], p: GenParams, default_max: int | None, param: str) -> Job:
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
        try:
            sampler = SamplerConfig(
                temperature=d.temperature if p.temperature is None else p.temperature,
                top_p=d.top_p if p.top_p is None else p.top_p,
                top_k=d.top_k if p.top_k is None else p.top_k,
                seed=p.seed,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                repetition_penalty=p.repetition_penalty,
            )
        except BadInputError as e:
            raise bad(str(e)) from None
        job = Job(ids=ids, sampler=sampler, max_new_tokens=max_new, stop=p.stop, loop=asyncio.get_running_loop())
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"{e}; retry later", None, "queue_full", type="rate_limit_error") from None
        return job

    async def collect(request: Request, job: Job):
        listener = asyncio.ensure_future(_wait_disconnect(request.receive))
        pieces = []
        try:
            while True:
                kind, value = await _next_event(job, listener)
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", None, None,
                                   type="server_error")
                else:
                    return "".join(pieces), value
        finally:
            listener.cancel()
            if not job.done:
                job.cancel.set()

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
        messages = parse_messages(body)
        check_model(body, name)  # (after the request's shape: a malformed request is a 400 whatever its model)
        try:
            _, ids = render_chat(engine, messages, add_generation_prompt=True)
        except BadInputError as e:
            raise bad(str(e), "messages", "invalid_value") from None
        job = make_job(ids, p, None, "messages")
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        def chunk(delta: dict, finish=None, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

        if p.stream:
            def events(kind, value):
                if kind == "start":
                    return [chunk({"role": "assistant", "content": ""})]
                if kind == "piece":
                    return [chunk({"content": value})]
                if kind == "error":
                    return [{"error": ApiError(500, f"generation failed: {value}", type="server_error").body()["error"]}]
                out = [chunk({}, _finish_reason(value), timings=_timings(value))]
                if p.include_usage:
                    out.append({"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                                "system_fingerprint": None, "choices": [], "usage": _usage(job, value),
                                "timings": _timings(value)})
                return out
            return SSEResponse(job, events, chat_headers)
        try:
            text, stats = await collect(request, job)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": now, "model": name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": _finish_reason(stats)}],
            "usage": _usage(job, stats), "timings": _timings(stats),
        }, headers=chat_headers)

    async def completions(request: Request):
        check_auth(request)
        body = await read_json(request)
        p = parse_common(body)
        if body.get("echo"):
            raise bad("echo is not supported", "echo", "unsupported_parameter")
        if body.get("suffix"):
            raise bad("suffix is not supported", "suffix", "unsupported_parameter")
        prompt = parse_prompt(body, engine.config.vocab_size)
        check_model(body, name)
        ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise bad("'prompt' is empty", "prompt", "invalid_value")
        job = make_job(ids, p, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt")
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        def chunk(text: str, finish=None, **extra) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}

        if p.stream:
            def events(kind, value):
                if kind == "start":
                    return []
                if kind == "piece":
                    return [chunk(value)]
                if kind == "error":
                    return [{"error": ApiError(500, f"generation failed: {value}", type="server_error").body()["error"]}]
                out = [chunk("", _finish_reason(value), timings=_timings(value))]
                if p.include_usage:
                    out.append({"id": cid, "object": "text_completion", "created": now, "model": name,
                                "choices": [], "usage": _usage(job, value)})
                return out
            return SSEResponse(job, events)
        try:
            text, stats = await collect(request, job)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": now, "model": name, "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(stats)}],
            "usage": _usage(job, stats), "timings": _timings(stats),
        })

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
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: api_error, HTTPException: http_error, Exception: internal_error,
    })
    app.state.scheduler = scheduler
    app.state.engine = engine
    app.state.model_name = name
    app.state.instruction_tuned = tuned
    app.state.request_timeout = float(request_timeout)
    return app
