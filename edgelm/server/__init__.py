"""edgelm's OpenAI-compatible server and web chat page (Starlette + uvicorn).

    from edgelm import Engine
    from edgelm.server import create_app, serve, BackgroundServer

    serve(Engine("m.edgelm"), host="127.0.0.1", port=8080)       # blocking, like `edgelm serve`
    with BackgroundServer(create_app(Engine("m.edgelm"))) as srv:  # in a thread, on a free port
        print(srv.url)
"""

from __future__ import annotations

import socket
import threading
import time

from .app import DEFAULT_REQUEST_TIMEOUT, create_app
from .protocol import ApiError

__all__ = ["create_app", "serve", "BackgroundServer", "ApiError"]


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(engine, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info", on_ready=None, **app_kw) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM shut down gracefully)."""
    import uvicorn

    app = create_app(engine, **app_kw)
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5,
                            access_log=log_level == "debug", http=_http_protocol(app))
    server = uvicorn.Server(config)
    if on_ready is not None:
        actual = sock.getsockname()[1]
        threading.Thread(target=_notify_when_started, args=(server, on_ready, actual), daemon=True).start()
    server.run(sockets=[sock])


def _http_protocol(app):
    """uvicorn's h11 protocol with the app's request-head timeout and JSON bodies on HTTP-level errors."""
    from .connection import protocol_class

    state = getattr(app, "state", None)
    return protocol_class(getattr(state, "request_timeout", DEFAULT_REQUEST_TIMEOUT))


def _notify_when_started(server, cb, port) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.02)
    if server.started:
        cb(port)


class BackgroundServer:
    """Run an app with uvicorn in a background thread on host:port (port 0 = a free one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import uvicorn

        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", timeout_graceful_shutdown=3,
                                access_log=False, http=_http_protocol(self.app))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="edgelm-uvicorn")
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(timeout)
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
