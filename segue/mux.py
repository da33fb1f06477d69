"""The multiplexed request plane: every call between one caller process (a frontend, or a
worker calling a remote stage) and one worker shares one WebSocket (GET /mux).

Why: with one HTTP response per call, every token of every stream is its own write on the
worker and its own read on the caller. Here, what all streams produced in one engine step
goes out as one WebSocket message and is read once. Calls are cancelled by an explicit
CANCEL record; a broken connection fails every call on it, which is what a dead worker
means anyway. A DETACH record ends a call as its caller's death would (a caller shutting
down lets a detachable call go on without it, for another caller to attach to).

Wire (binary messages; each holds one or more records, big-endian):
  caller -> worker   [op u8][call id u32][length u32][payload]   OPEN: msgpack EngineRequest
                                                                  CANCEL, DETACH: none
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

import aiohttp
from aiohttp import web

log = logging.getLogger("segue.mux")

OP_RECORD = struct.Struct(">BII")
CALL_RECORD = struct.Struct(">II")
_HIGH_WATER = 4 * 1024 * 1024  # bytes queued for the socket before writers wait
MAX_MESSAGE = 64 * 1024 * 1024


class Op(IntEnum):
    OPEN = 1
    CANCEL = 2
    DETACH = 3


class Outbox:
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

    __slots__ = ("sid", "out", "cancelled", "lost")

    def __init__(self, sid: int, out: Outbox) -> None:
        self.sid = sid
        self.out = out
        self.cancelled = False  # the caller sent CANCEL
        self.lost = False  # the connection went (the caller died, or the network), or DETACH

    async def write(self, data: bytes) -> None:
        if data:
            self.out.put(CALL_RECORD.pack(self.sid, len(data)), data)
            if self.out.size > _HIGH_WATER:
                await self.out.room()

    async def write_eof(self, data: bytes = b"") -> None:
        await self.write(data)  # the end record goes out when the call's task ends

    def has_room(self) -> bool:
        return self.out.size <= _HIGH_WATER and not self.out.closed

    def write_now(self, data: bytes) -> None:
        if not (self.cancelled or self.lost or self.out.closed):
            self.out.put(CALL_RECORD.pack(self.sid, len(data)), data)

    async def flush(self) -> None:
        await self.out.drained()

    @property
    def caller_gone(self) -> bool:
        return self.cancelled or self.out.closed

    @property
    def connection_lost(self) -> bool:
        return self.lost and not self.cancelled


Serve = Callable[[bytes, MuxSink], Awaitable[None]]


class MuxServer:
    """A worker's end of one mux connection: a task per call, cancelled by CANCEL or when
    the connection goes (the same path as an HTTP handler whose client left)."""

    def __init__(self, ws: web.WebSocketResponse, serve: Serve) -> None:
        self.ws = ws
        self.serve = serve
        self.out = Outbox(ws)
        self.calls: dict[int, tuple[asyncio.Task[None], MuxSink]] = {}

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type is not aiohttp.WSMsgType.BINARY or not self._records(msg.data):
                    log.warning("mux: malformed message from %s; closing", self.ws)
                    break
        finally:
            tasks = [t for t, _ in self.calls.values()]
            for _, sink in self.calls.values():
                sink.lost = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.out.flush_and_stop()

    def _records(self, data: bytes) -> bool:
        pos, n = 0, len(data)
        while pos < n:
            if n - pos < OP_RECORD.size:
                return False
            op, sid, size = OP_RECORD.unpack_from(data, pos)
            pos += OP_RECORD.size
            if n - pos < size:
                return False
            if op == Op.OPEN and sid not in self.calls:
                sink = MuxSink(sid, self.out)
                task = asyncio.create_task(self._call(data[pos : pos + size], sink))
                self.calls[sid] = (task, sink)
            elif op == Op.CANCEL or op == Op.DETACH:
                call = self.calls.get(sid)
                if call is not None:
                    if op == Op.CANCEL:
                        call[1].cancelled = True
                    else:
                        call[1].lost = True
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
                self.out.put(CALL_RECORD.pack(sink.sid, 0))

    async def close(self) -> None:
        """Sends what is queued and closes the connection (worker shutdown)."""
        await self.out.flush_and_stop()
        await self.ws.close()
