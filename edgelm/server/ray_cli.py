"""`edgelm serve --ray`: start (or join) Ray, deploy server/ray_serve.build_app, and serve
until interrupted. Kept apart from ray_serve.py so that a missing extra is one clear line."""

from __future__ import annotations

import json
import sys
import time

from ..errors import BadInputError


def serve_on_ray(model, *, host: str, port: int, shards: int, address: str | None, autoscaling: str | None,
                 engine_kw: dict, app_kw: dict) -> None:
    try:
        import ray
        from ray import serve

        from .ray_serve import build_app
    except ImportError as e:
        raise BadInputError(f"--ray needs the edgelm[ray] extra (Ray Serve; {e}): pip install 'edgelm[ray]'") from None
    opts: dict = {}
    if autoscaling:
        try:
            opts["autoscaling_config"] = json.loads(autoscaling)
        except ValueError as e:
            raise BadInputError(f"--ray-autoscaling is not JSON: {e}") from None
        if not isinstance(opts["autoscaling_config"], dict):
            raise BadInputError("--ray-autoscaling must be a JSON object (Ray Serve's autoscaling_config)")
    if model is None:  # every shard loads the same file: prepare the default model once, here
        from ..runtime.defaults import ensure_default_model

        model = ensure_default_model()
    # what was not given: each shard takes `edgelm serve`'s defaults for its own engine
    app_kw = {k: v for k, v in app_kw.items() if v is not None}
    engine_kw = {k: v for k, v in engine_kw.items() if v is not None}
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_app(model, shards=shards, engine_kw=engine_kw, app_kw=app_kw, shard_options=opts),
                  name="edgelm", route_prefix="/")
    except Exception as e:  # a deployment that failed to start (a bad bundle, a port in use, ...)
        raise BadInputError(f"Ray Serve could not start edgelm: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"edgelm: serving {model} on Ray Serve at http://{shown}:{port} ({shards} shard"
          f"{'s' if shards > 1 else ''}, prefix-affinity routing; OpenAI API under /v1)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
