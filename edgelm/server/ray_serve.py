"""Scale-out on Ray Serve (the `edgelm[ray]` extra): N edgelm shards behind Ray Serve's HTTP
proxy, with the same OpenAI routes, and requests that share a prompt prefix routed to the
same shard.

Layout:
- `EdgelmShard`, one deployment per shard ("edgelm-shard-0", ...): each replica loads its own
  Engine and runs edgelm's own ASGI app (server/app.create_app: batching, the session pool
  that reuses a prompt's KV, metrics, errors), one request at a time through `forward`, which
  streams the app's response back (SSE included).
- `EdgelmRouter`, the ingress: it reads a request's body, takes its affinity key (the chat's
  system prompt and first message, or the completion prompt's head) and sends it to the
  shard that rendezvous hashing picks for that key. Requests that share a prefix therefore
  meet the shard whose session pool holds its KV. A shard's deployment may autoscale
  (`autoscaling_config`, passed through): its replicas share its keys.

A shard that fails before answering gives the client a 503 with an OpenAI-style error body;
one that fails mid-stream ends the stream with an SSE `error` event; the other shards keep
serving, and Ray Serve restarts the failed replica. Ray's own cluster authentication stays as
Ray configures it; the HTTP API is protected by edgelm's `--api-key`, which every shard
checks.

    edgelm serve --ray --replicas 2 --model m.edgelm        # a local Ray, proxy on --port
    python -c "from edgelm.server.ray_serve import build_app; ..."   # your own serve.run
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

AFFINITY_CHARS = 512  # the prompt head that decides the shard


def affinity_key(path: str, body: bytes) -> str | None:
    """What decides a request's shard: the system prompt and the first message of a chat, or
    the first AFFINITY_CHARS of a completion prompt (None: any shard)."""
    try:
        req = json.loads(body or b"null")
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    if path.endswith("/chat/completions") and isinstance(req.get("messages"), list):
        head = req["messages"][:2]
        return json.dumps(head, sort_keys=True, default=str)[:AFFINITY_CHARS * 2]
    prompt = req.get("prompt", req.get("input"))
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else None
    if isinstance(prompt, (str, list)):
        return str(prompt)[:AFFINITY_CHARS]
    return None


def pick_shard(key: str | None, n: int, fallback: int = 0) -> int:
    """Rendezvous (highest-random-weight) hashing: a key keeps its shard as long as that
    shard exists, and only the keys of a removed shard move."""
    if key is None or n <= 1:
        return fallback % max(n, 1)
    return max(range(n), key=lambda i: hashlib.blake2b(f"{i}\0{key}".encode(), digest_size=8).digest())


@serve.deployment
class EdgelmShard:
    """One shard's replica: an Engine and edgelm's ASGI app."""

    def __init__(self, model, engine_kw: dict, app_kw: dict, shard: int):
        from ..runtime.engine import Engine
        from .app import create_app, default_max_body
        from .scheduler import auto_parallel

        self.shard = shard
        self.engine = Engine(model, **engine_kw)
        app_kw = dict(app_kw)  # the defaults of `edgelm serve`, for what was not given
        if app_kw.get("max_body_bytes") is None:
            app_kw["max_body_bytes"] = default_max_body(self.engine)
        if app_kw.get("parallel") is None:
            app_kw["parallel"] = auto_parallel(self.engine)
        self.app = create_app(self.engine, **app_kw)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """Run one request through the app: yields (status, headers) first, then body chunks.
        Cancelling the generator (the client went away) is a disconnect for the app."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
                 "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": ("ray-serve", 0),
                 "server": ("edgelm", 0)}
        task = asyncio.create_task(self.app(scope, receive, out.put))
        try:
            while True:
                msg = await out.get()
                if msg["type"] == "http.response.start":
                    hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                    yield (msg["status"], hdrs + [("x-edgelm-shard", str(self.shard))])
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield bytes(msg["body"])
                    if not msg.get("more_body"):
                        break
            await task
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5)


@serve.deployment
class EdgelmRouter:
    """The ingress: picks each request's shard by its prompt prefix and streams the answer."""

    def __init__(self, *shards):
        self.shards = [h.options(stream=True) for h in shards]
        self._next = 0

    async def __call__(self, request: Request):
        body = await request.body()
        key = affinity_key(request.url.path, body)
        self._next += 1
        i = pick_shard(key, len(self.shards), self._next)
        gen = self.shards[i].forward.remote(request.method, request.url.path, request.url.query.encode(),
                                            list(request.headers.raw), body)
        try:
            status, headers = await gen.__anext__()
        except Exception as e:  # the shard died or failed before answering
            return JSONResponse({"error": {"message": f"edgelm shard {i} failed: {type(e).__name__}: "
                                                      f"{str(e).splitlines()[0] if str(e) else ''}",
                                           "type": "server_error", "param": None, "code": None}},
                                status_code=503, headers={"Retry-After": "1"})
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)
        kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]

        async def rest():
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:  # the shard died mid-stream: say so where the format allows
                if sse:
                    err = {"error": {"message": f"edgelm shard {i} failed mid-stream: {type(e).__name__}",
                                     "type": "server_error"}}
                    yield f"event: error\ndata: {json.dumps(err)}\n\n".encode()

        resp = StreamingResponse(rest(), status_code=status)
        resp.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in kept]
        return resp


def build_app(model, *, shards: int = 2, engine_kw: dict | None = None, app_kw: dict | None = None,
              shard_options: dict | None = None):
    """The Ray Serve application: `shards` EdgelmShard deployments behind an EdgelmRouter.
    engine_kw: Engine arguments (backend, threads, max_tokens, ...); app_kw: create_app
    arguments (api_key, parallel, max_queue, ...); shard_options: deployment options of each
    shard (num_replicas or autoscaling_config, ray_actor_options, max_ongoing_requests, ...)."""
    # a replica reserves as many CPUs as its kernels' threads (1 where not given); the router
    # only moves bytes
    cpus = (engine_kw or {}).get("threads") or 1
    opts = {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": cpus}} | dict(shard_options or {})
    handles = [EdgelmShard.options(name=f"edgelm-shard-{i}", **opts).bind(str(model) if model else None,
                                                                           dict(engine_kw or {}), dict(app_kw or {}), i)
               for i in range(shards)]
    return EdgelmRouter.options(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}).bind(*handles)
