"""`edgelm serve`: the OpenAI-compatible server and web chat page."""

from __future__ import annotations

import math

import click

from .options import attn_precision_option, backend_option, deterministic_option, kv_dtype_option


@click.command()
@click.option("--model", "-m", type=click.Path(), default=None,
              help="A .edgelm bundle (default: Gemma 3 270M, prepared on first use).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (localhost by default; 0.0.0.0 exposes it to the network).")
@click.option("--port", "-p", type=int, default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="EDGELM_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (or set EDGELM_API_KEY).")
@click.option("--parallel", type=click.IntRange(min=1, max=64), default=None,
              help="Sequences decoded together (continuous batching): each step reads the weights once for all "
                   "(default: as many full KV caches as fit in a quarter of free memory, at most 8).")
@click.option("--prefix-cache-mib", type=click.FloatRange(min=0), default=256, show_default=True,
              help="Past the session pool, keep finished requests' KV (least recently used dropped first) while it "
                   "takes at most this many MiB, so that more prompt prefixes are reused; 0 keeps the pool alone.")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait behind the one being generated; more get 429.")
@click.option("--max-body", type=click.IntRange(min=1024), default=None,
              help="Largest request body in bytes; larger ones get 413. Default: 1 MiB, or 32 MiB for a bundle "
                   "that takes images or audio (sent as base64).")
@click.option("--allow-local-files", is_flag=True,
              help="Let image_url parts name files on this machine (off: images and audio come as data: URLs).")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              metavar="SECONDS",
              help="Seconds a client has to send a request's line and headers, and again its body; "
                   "past it, 408 and the connection is closed.")
@click.option("--max-tokens", type=int, default=None, help="KV-cache capacity (default: 4096, or the model's context if shorter).")
@click.option("--threads", "-t", type=int, default=None, help="Kernel threads (default: physical cores).")
@backend_option
@kv_dtype_option
@attn_precision_option
@deterministic_option
@click.option("--model-name", default=None, help="The model id the API reports (default: the bundle's file name).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--ray", "use_ray", is_flag=True,
              help="Scale out on Ray Serve (the edgelm[ray] extra): --replicas shards behind Ray Serve's HTTP proxy, "
                   "requests sharing a prompt prefix routed to the same shard.")
@click.option("--replicas", type=click.IntRange(min=1, max=256), default=2, show_default=True,
              help="With --ray: the number of shards (each its own Engine).")
@click.option("--ray-address", default=None, help="With --ray: an existing Ray cluster (default: start a local one).")
@click.option("--ray-autoscaling", default=None, metavar="JSON",
              help="With --ray: Ray Serve autoscaling_config for each shard, e.g. "
                   "'{\"min_replicas\": 1, \"max_replicas\": 4}'.")
def serve(model, host, port, api_key, parallel, prefix_cache_mib, max_queue, max_body, allow_local_files,
          request_timeout, max_tokens,
          threads, backend, kv_dtype, attn_precision, deterministic, model_name, log_level, use_ray, replicas, ray_address,
          ray_autoscaling):
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), /health and
    a web chat page at /."""
    from ..errors import BadInputError
    from ..runtime.engine import Engine
    from ..runtime.modelinfo import BASE_MODEL_NOTICE, is_instruction_tuned
    from ..server import serve as run_server

    if not 0 <= port <= 65535:
        raise BadInputError(f"--port must be in 0..65535, got {port}")
    if not math.isfinite(request_timeout):
        raise BadInputError(f"--request-timeout must be a finite number of seconds > 0, got {request_timeout}")
    if use_ray:
        from ..server.ray_cli import serve_on_ray

        serve_on_ray(model, host=host, port=port, shards=replicas, address=ray_address, autoscaling=ray_autoscaling,
                     engine_kw={"backend": backend, "threads": threads, "max_tokens": max_tokens, "kv_dtype": kv_dtype,
                                "deterministic": deterministic, "attn_precision": attn_precision},
                     app_kw={"api_key": api_key, "max_queue": max_queue, "max_body_bytes": max_body,
                             "prefix_cache_bytes": int(prefix_cache_mib * 2**20),
                             "model_name": model_name, "request_timeout": request_timeout, "parallel": parallel,
                             "allow_local_files": allow_local_files})
        return
    eng = Engine(model, backend=backend, threads=threads, max_tokens=max_tokens,
                 kv_dtype=kv_dtype, deterministic=deterministic, attn_precision=attn_precision)

    def ready(actual_port):
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"edgelm: serving {eng.path.name} on http://{shown}:{actual_port} "
                   f"(OpenAI API under /v1, web chat at /){' with an API key' if api_key else ''}; "
                   f"{parallel} request{'s' if parallel > 1 else ''} decoded together", err=True)
        if is_instruction_tuned(eng.bundle.header) is False:
            click.echo(f"edgelm: note: {BASE_MODEL_NOTICE} /v1/completions suits it.", err=True)

    if max_body is None:
        from ..server.app import default_max_body

        max_body = default_max_body(eng)
    if parallel is None:
        from ..server.scheduler import auto_parallel

        parallel = auto_parallel(eng)
    try:
        run_server(eng, host=host, port=port, log_level=log_level, on_ready=ready, api_key=api_key,
                   max_queue=max_queue, max_body_bytes=max_body, model_name=model_name,
                   request_timeout=request_timeout, parallel=parallel, allow_local_files=allow_local_files,
                   prefix_cache_bytes=int(prefix_cache_mib * 2**20))
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    except OSError as e:
        raise BadInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    click.echo("edgelm: server stopped", err=True)
