"""Client connection limits aiohttp does not have: how many may be open at once, and how
long one may take to send a request's head (request line and headers).

`GuardedRunner` wraps aiohttp's protocol factory. Past `max_connections` open connections a
new one gets a canned 503 (OpenAI's error shape, Retry-After) and is closed before anything
is parsed. Each connection has `header_timeout` seconds, from its opening and again from the
end of each response, to deliver a complete request head; one that does not (a slowloris
client) gets a 408 and is closed; an idle keep-alive connection is closed without one (a
client may be about to reuse it, and must not read a 408 as its answer). The frontend's
middleware tells the guard when a head has arrived (`head_received`) and when its response
is done (`response_done`).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from segue.api import openai as oai


def _canned(err: oai.APIError) -> bytes:
    """A whole HTTP response carrying `err`, written before any request is parsed."""
    body = json.dumps(err.body()).encode()
    reason = HTTPStatus(err.status).phrase
    extra = "".join(f"{k}: {v}\r\n" for k, v in err.headers.items())
    head = (
        f"HTTP/1.1 {err.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY = _canned(
    oai.APIError(
        503,
        "this frontend has too many open connections (--max-client-connections); retry shortly",
        code="unavailable",
        headers={"Retry-After": "1"},
    )
)
HEAD_TIMEOUT = _canned(
    oai.APIError(
        408,
        "the request's headers did not arrive in time (--header-timeout)",
        code="request_timeout",
    )
)


class _Refuse(asyncio.Protocol):
    """Answers 503 and half-closes; what the client sends is read and dropped until it
    closes (closing with its bytes unread would reset the connection, and the client might
    lose the answer), for `LINGER_S` at most."""

    LINGER_S = 5.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        t.write(TOO_MANY)
        if t.can_write_eof():
            t.write_eof()
        self._timer = asyncio.get_running_loop().call_later(self.LINGER_S, t.close)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class ConnectionGuard:
    """aiohttp's `Server` with the limits above; everything else delegates to it."""

    def __init__(self, server: web.Server, max_connections: int, header_timeout: float) -> None:
        self._server = server
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        # per connection waiting for a head: its timer, and whether it is a first request
        self._timers: dict[RequestHandler, tuple[asyncio.TimerHandle, bool]] = {}
        self.refused = 0
        self.timed_out = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def __call__(self) -> asyncio.BaseProtocol:
        if self.max_connections and len(self._server.connections) >= self.max_connections:
            self.refused += 1
            return _Refuse()
        handler = self._server()
        self._arm(handler, first=True)
        return handler

    def _arm(self, handler: RequestHandler, first: bool) -> None:
        if self.header_timeout:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.header_timeout, self._expire, handler)
            self._timers[handler] = (timer, first)

    def _expire(self, handler: RequestHandler) -> None:
        _, first = self._timers.pop(handler, (None, False))
        transport = handler.transport
        if transport is None or transport.is_closing():
            return
        if first:
            self.timed_out += 1
            transport.write(HEAD_TIMEOUT)
        handler.force_close()
        transport.close()

    def head_received(self, handler: Any) -> None:
        timer, _ = self._timers.pop(handler, (None, False))
        if timer is not None:
            timer.cancel()

    def response_done(self, handler: Any) -> None:
        if isinstance(handler, RequestHandler) and handler.transport is not None:
            self._arm(handler, first=False)


class GuardedRunner(web.AppRunner):
    def __init__(
        self, app: web.Application, max_connections: int, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._limits = (max_connections, header_timeout)
        self.guard: ConnectionGuard | None = None

    async def _make_server(self) -> web.Server:
        self.guard = ConnectionGuard(await super()._make_server(), *self._limits)
        return cast(web.Server, self.guard)
