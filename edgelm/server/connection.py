"""The HTTP/1.1 connection layer under the app: uvicorn's h11 protocol with two changes.

- A request-head timeout. uvicorn times out idle kept-alive connections (`timeout_keep_alive`)
  but not a new connection that never finishes its request line and headers, and h11 has no
  timeout of its own. Here a request's head must arrive within `request_timeout` seconds of the
  connection opening, or of the first byte of a later request on a kept-alive connection. If it
  does not, a client that sent part of a head gets a JSON 408 and the connection is closed; one
  that sent nothing is just closed. (The app times the body; see create_app.)
- Requests that h11 rejects before the app sees them (a malformed Content-Length or request
  line, oversized headers) get an OpenAI-style JSON error body naming h11's reason instead of
  uvicorn's plain-text "Invalid HTTP request received.".

`protocol_class(request_timeout)` is what `serve` and `BackgroundServer` pass to uvicorn as `http`.
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError

_DEFAULT_MAX_HEAD = 16 * 1024  # h11's and uvicorn's default limit on a request's line and headers


def _json_response(err: ApiError) -> bytes:
    """A complete `Connection: close` response with err's JSON body."""
    body = json.dumps(err.body()).encode("utf-8")
    reason = HTTPStatus(err.status).phrase
    head = (f"HTTP/1.1 {err.status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Connection(h11.Connection):
    """Remembers why h11 rejected the peer's data (uvicorn drops the reason)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class EdgelmH11Protocol(H11Protocol):
    request_timeout: float = 30.0  # set per server by protocol_class()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.h11_max_incomplete_event_size
        self._max_head = size if size is not None else _DEFAULT_MAX_HEAD
        self.conn = _Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # whether part of the awaited head has arrived

    # ---------------------------------------------------------------- the head timeout

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.request_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self.conn.their_state is h11.IDLE
        if waiting and self._head_timer is None:
            self._arm()  # the first bytes of a later request on a kept-alive connection
        if waiting and data:
            self._head_bytes = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is in (or the connection failed)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self._head_bytes:
            self.logger.info("closing a connection whose request head did not arrive within %gs",
                             self.request_timeout)
            err = ApiError(408, f"the request line and headers did not arrive within {self.request_timeout:g} s "
                                f"(--request-timeout)", None, "request_timeout")
            self.transport.write(_json_response(err))
        self.transport.close()

    # ---------------------------------------------------------------- JSON instead of plain text

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        e = getattr(self.conn, "last_error", None)
        status = e.error_status_hint if e is not None else 400  # h11's: 400, 431 (head too large) or 501
        if status == 431:
            err = ApiError(431, f"the request line and headers are larger than {self._max_head} bytes", None,
                           "invalid_http")
        else:
            why = f": {str(e)[:200]}" if e is not None and str(e) else ""  # (h11's reason may quote the request)
            err = ApiError(status, f"invalid HTTP request{why}", None, "invalid_http")
        self.transport.write(_json_response(err))
        self.transport.close()


def protocol_class(request_timeout: float) -> type[EdgelmH11Protocol]:
    """An EdgelmH11Protocol subclass with this head timeout, for uvicorn.Config(http=...)."""
    return type("EdgelmH11Protocol", (EdgelmH11Protocol,), {"request_timeout": float(request_timeout)})
