"""The multiplexed request plane: every call between one caller process (a frontend, or a
worker calling a remote stage) and one worker shares one WebSocket (GET /mux).

Why: with one HTTP response per call, every token of every stream is its own write on the
worker and its own read on the caller. Here, what all streams produced in one engine step
goes out as one WebSocket message and is read once. Calls are cancelled by an explicit
CANCEL record; a broken connection fails every call on it, which is what a dead worker
means anyway.

Wire (binary messages; each holds one or more records, big-endian):
  caller -> worker   [op u8][call id u32][length u32][payload]   OPEN: msgpack EngineRequest
                                                                  CANCEL: no payload
  worker -> caller   [call id u32][length u32][frames]            whole length-prefixed
                                                                  frames (segue.protocol);
                                                                  length 0: the call ended
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Protocol

import aiohttp
from aiohttp import web

from segue.failures import Failure, FailureReason

log = logging.getLogger("segue.mux")

_OP = struct.Struct(">BII")
_REC = struct.Struct(">II")
_HIGH_WATER = 4 * 1024 * 1024  # bytes queued for the socket before writers wait
MAX_MESSAGE = 64 * 1024 * 1024


class Op(IntEnum):
    OPEN = 1
    CANCEL = 2


class FrameSink(Protocol):
    """Where a worker writes one call's frames (an HTTP response or a mux call)."""

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...

    async def flush(self) -> None:
        """Returns once what was written has been handed to the socket."""

    @property
    def caller_gone(self) -> bool: ...


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


class _Outbox:
    """Collects what the tasks woken by one engine step write and sends it as one message:
    the writer task is woken by the first write and runs after the tasks already ready."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.parts: list[bytes] = []
        self.size = 0
        self.closed = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()  # nothing queued and no send in progress
        self._empty.set()
        self._task = asyncio.create_task(self._run(), name="mux-writer")

    def put(self, head: bytes, body: bytes = b"") -> None:
        if self.closed:
            raise ConnectionResetError("request-plane connection closed")
        self.parts.append(head)
        if body:
            self.parts.append(body)
        self.size += len(head) + len(body)
        self._empty.clear()
        if self.size > _HIGH_WATER:
            self._room.clear()
        self._wake.set()

    async def room(self) -> None:
        """Returns once the socket has taken what was queued (back-pressure)."""
        while not self._room.is_set():
            if self.closed:
                raise ConnectionResetError("request-plane connection closed")
            await self._room.wait()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self.parts:
                    data = b"".join(self.parts)
                    self.parts.clear()
                    self.size = 0
                    await self.ws.send_bytes(data)
                    self._room.set()
                if not self.parts:
                    self._empty.set()
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass  # the reader side sees the connection go and fails what is open
        finally:
            self.closed = True
            self._room.set()
            self._empty.set()

    async def drained(self) -> None:
        """Returns once everything queued so far has been handed to the socket."""
        await self._empty.wait()

    async def flush_and_stop(self) -> None:
        """Sends what is queued, then stops the writer."""
        await self.drained()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ----------------------------------------------------------------------------- worker side


class MuxSink:
    """One call on a worker's mux connection."""

    __slots__ = ("sid", "out", "cancelled")

    def __init__(self, sid: int, out: _Outbox) -> None:
        self.sid = sid
        self.out = out
        self.cancelled = False

    async def write(self, data: bytes) -> None:
        if data:
            self.out.put(_REC.pack(self.sid, len(data)), data)
            if self.out.size > _HIGH_WATER:
                await self.out.room()

    async def write_eof(self, data: bytes = b"") -> None:
        await self.write(data)  # the end record goes out when the call's task ends

    async def flush(self) -> None:
        await self.out.drained()

    @property
    def caller_gone(self) -> bool:
        return self.cancelled or self.out.closed


Serve = Callable[[bytes, MuxSink], Awaitable[None]]


class MuxServer:
    """A worker's end of one mux connection: a task per call, cancelled by CANCEL or when
    the connection goes (the same path as an HTTP handler whose client left)."""

    def __init__(self, ws: web.WebSocketResponse, serve: Serve) -> None:
        self.ws = ws
        self.serve = serve
        self.out = _Outbox(ws)
        self.calls: dict[int, tuple[asyncio.Task[None], MuxSink]] = {}

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.BINARY or not self._records(msg.data):
                    log.warning("mux: malformed message from %s; closing", self.ws)
                    break
        finally:
            tasks = [t for t, _ in self.calls.values()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.out.flush_and_stop()

    def _records(self, data: bytes) -> bool:
        pos, n = 0, len(data)
        while pos < n:
            if n - pos < _OP.size:
                return False
            op, sid, size = _OP.unpack_from(data, pos)
            pos += _OP.size
            if n - pos < size:
                return False
            if op == Op.OPEN and sid not in self.calls:
                sink = MuxSink(sid, self.out)
                task = asyncio.create_task(self._call(data[pos : pos + size], sink))
                self.calls[sid] = (task, sink)
            elif op == Op.CANCEL:
                call = self.calls.get(sid)
                if call is not None:
                    call[1].cancelled = True
                    call[0].cancel()
            else:
                return False
            pos += size
        return True

    async def _call(self, payload: bytes, sink: MuxSink) -> None:
        try:
            await self.serve(payload, sink)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.calls.pop(sink.sid, None)
            if not self.out.closed:
                self.out.put(_REC.pack(sink.sid, 0))

    async def close(self) -> None:
        """Sends what is queued and closes the connection (worker shutdown)."""
        await self.out.flush_and_stop()
        await self.ws.close()


# ----------------------------------------------------------------------------- caller side


class MuxCall:
    """The caller's end of one call: chunks of whole frames, then the end or a failure."""

    __slots__ = ("sid", "chunks", "ended", "error", "_waiter")

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.chunks: list[bytes] = []
        self.ended = False
        self.error: Failure | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def fail(self, error: Failure) -> None:
        self.error = error
        self._wake()

    async def get(self) -> bytes:
        """The frames received since the last call; b"" once the call has ended."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        return data


class MuxConnection:
    """A caller's connection to one worker, carrying all its calls to that worker."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, url: str) -> None:
        self.ws = ws
        self.url = url
        self.out = _Outbox(ws)
        self.calls: dict[int, MuxCall] = {}
        self._next = 0
        self.loop = asyncio.get_running_loop()
        self.last_heard = self.loop.time()
        self.closed = False
        self._reader = asyncio.create_task(self._read(), name=f"mux-reader {url}")

    def open(self, request: bytes) -> MuxCall:
        if self.closed or self.out.closed:
            raise ConnectionResetError("request-plane connection closed")
        self._next = (self._next + 1) & 0xFFFFFFFF
        call = MuxCall(self._next)
        self.calls[call.sid] = call
        self.out.put(_OP.pack(Op.OPEN, call.sid, len(request)), request)
        return call

    def cancel(self, call: MuxCall) -> None:
        """The caller is done with a call before its end (left, or gave up on it)."""
        if self.calls.pop(call.sid, None) is not None and not self.out.closed:
            self.out.put(_OP.pack(Op.CANCEL, call.sid, 0))

    def forget(self, call: MuxCall) -> None:
        self.calls.pop(call.sid, None)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once the connection has closed (its reader has ended)."""
        self._reader.add_done_callback(lambda _: callback())

    async def _read(self) -> None:
        why, reason = "connection closed", FailureReason.STREAM_BROKEN
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        why, reason = "a text message", FailureReason.BAD_FRAME
                    break
                self.last_heard = self.loop.time()
                if not self._dispatch(msg.data):
                    why, reason = "malformed message", FailureReason.BAD_FRAME
                    break
        except (ConnectionError, aiohttp.ClientError) as e:
            why = repr(e)
        finally:
            self._fail_all(why, reason)
            if reason is FailureReason.BAD_FRAME:
                await self.ws.close()

    def _dispatch(self, data: bytes) -> bool:
        calls = self.calls
        pos, n = 0, len(data)
        while pos < n:
            if n - pos < _REC.size:
                return False
            sid, size = _REC.unpack_from(data, pos)
            pos += _REC.size
            if n - pos < size:
                return False
            call = calls.get(sid)
            if call is not None:
                if size:
                    call.push(data[pos : pos + size])
                else:
                    del calls[sid]
                    call.end()
            pos += size
        return True

    def _fail_all(self, why: str, reason: FailureReason = FailureReason.STREAM_BROKEN) -> None:
        self.closed = True
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call.fail(Failure(reason, None, f"request plane: {why}"))

    async def close(self) -> None:
        self.closed = True
        await self.out.flush_and_stop()
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def abort(self) -> None:
        """The worker went silent: fail every call on the connection now and close it in
        the background (a silent peer is given `ws_close` seconds to answer the close)."""
        self._fail_all("worker silent")
        task = self.loop.create_task(self.close())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


class MuxPool:
    """One connection per worker URL, made on first use and again after one breaks."""

    def __init__(self, session: aiohttp.ClientSession, path: str, timeout: float) -> None:
        self.session = session
        self.path = path
        self.timeout = timeout  # for the handshake: a stopped worker's kernel still accepts
        self._conns: dict[str, asyncio.Task[MuxConnection]] = {}

    async def connection(self, url: str) -> MuxConnection:
        task = self._conns.get(url)
        if task is not None and task.done():
            if task.cancelled() or task.exception() is not None or task.result().closed:
                task = None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(url))
            self._conns[url] = task
            task.add_done_callback(lambda t: self._settled(url, t))
        return await asyncio.shield(task)

    def _settled(self, url: str, task: asyncio.Task[MuxConnection]) -> None:
        """A connection that failed is forgotten at once, one that opened when it closes:
        workers come and go on new ports, and a closed connection kept per old address
        would grow the frontend for as long as it runs."""
        if task.cancelled() or task.exception() is not None:
            self._forget(url, task)
        else:
            task.result().on_closed(lambda: self._forget(url, task))

    def _forget(self, url: str, task: asyncio.Task[MuxConnection]) -> None:
        if self._conns.get(url) is task:
            del self._conns[url]

    async def _connect(self, url: str) -> MuxConnection:
        async with asyncio.timeout(self.timeout):
            ws = await self.session.ws_connect(
                url + self.path,
                compress=0,
                max_msg_size=MAX_MESSAGE,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            )
        return MuxConnection(ws, url)

    async def close(self) -> None:
        tasks, self._conns = list(self._conns.values()), {}
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                await t.result().close()
            else:
                t.cancel()
