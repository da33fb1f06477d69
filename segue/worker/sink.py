"""How a worker answers one call: frames written to a `FrameSink` (the caller's mux call,
`segue.mux.MuxSink`, or the response of a POST /generate, `HttpSink`), or a `StageError`
that ends the call with an Error frame."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from segue.protocol import Error, ErrorCode


class StageError(Exception):
    """Ends a call with an Error frame (the caller's failure table decides what next)."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.frame = Error(code, message, retryable)


class FrameSink(Protocol):
    """Where a worker writes one call's frames (an HTTP response or a mux call)."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...

    async def flush(self) -> None:
        """Returns once what was written has been handed to the socket."""

    @property
    def caller_gone(self) -> bool: ...

    @property
    def connection_lost(self) -> bool:
        """The caller's connection broke (it may have died), as opposed to a cancel."""
        ...


class HttpSink:
    """A call made as one HTTP POST /generate (the request plane without mux)."""

    __slots__ = ("request", "resp")

    def __init__(self, request: web.Request, resp: web.StreamResponse) -> None:
        self.request = request
        self.resp = resp

    async def write(self, data: bytes) -> None:
        await self.resp.write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        await self.resp.write_eof(data)

    async def flush(self) -> None:
        pass  # aiohttp hands each write to the transport at once

    @property
    def caller_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    @property
    def connection_lost(self) -> bool:
        return False  # a closed HTTP call is a cancel or a death alike: never detached
