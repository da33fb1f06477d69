"""How a worker answers one call: frames written to a `FrameSink` (the caller's mux call,
`segue.mux.MuxSink`, or the response of a POST /generate, `HttpSink`), or a `StageError`
that ends the call with an Error frame; `DirectTokens` writes a call's tokens as the engine
hands them over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from segue.protocol import Error, ErrorCode, Logprob, Tokens, encode_frame


class StageError(Exception):
    """Ends a call with an Error frame (the caller's failure table decides what next)."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.frame = Error(code, message, retryable)


class FrameSink(Protocol):
    """Where a worker writes one call's frames (an HTTP response or a mux call)."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...

    def has_room(self) -> bool:
        """`write_now` may be used: the connection is not behind."""
        ...

    def write_now(self, data: bytes) -> None:
        """Queues `data` without waiting (dropped if the call is over)."""

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

    def has_room(self) -> bool:
        return False  # aiohttp's response writes are coroutines

    def write_now(self, data: bytes) -> None:
        raise NotImplementedError("an HTTP call is written by its task")

    async def flush(self) -> None:
        pass  # aiohttp hands each write to the transport at once

    @property
    def caller_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    @property
    def connection_lost(self) -> bool:
        return False  # a closed HTTP call is a cancel or a death alike: never detached


class DirectTokens:
    """A call's place in its stream, and the writer of the tokens the engine hands over
    after the first (`RequestStream.direct`): those of one pass of the event loop go out as
    one frame, written by a callback queued behind them, so the call's task is not woken per
    token (it flushes them before it writes anything itself). A connection that is behind
    leaves the tokens to the task, which waits for room. 256 streams on one worker took
    4.6 us of the event loop per token through the task, 2.3 us this way
    (bench/worker_delivery.py)."""

    __slots__ = ("sink", "offset", "sent", "written", "frame")

    def __init__(
        self,
        sink: FrameSink,
        offset: int,
        sent: list[int] | None,
        written: Callable[[int], None],
    ) -> None:
        self.sink, self.offset, self.sent = sink, offset, sent
        self.written = written  # told how many tokens went out
        self.frame: Tokens | None = None  # tokens taken, not yet written

    def __call__(self, token_id: int, logprob: Logprob | None) -> bool:
        frame = self.frame
        if frame is None:
            if not self.sink.has_room():
                return False
            lps = None if logprob is None else [logprob]
            self.frame = Tokens(self.offset, [token_id], lps)
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            frame.token_ids.append(token_id)
            if logprob is not None and frame.logprobs is not None:
                frame.logprobs.append(logprob)
        self.offset += 1
        if self.sent is not None:
            self.sent.append(token_id)
        return True

    def flush(self) -> None:
        """Writes the tokens taken (the task calls it before it writes: they come first)."""
        frame, self.frame = self.frame, None
        if frame is None:
            return
        self.sink.write_now(encode_frame(frame))
        self.written(len(frame.token_ids))
