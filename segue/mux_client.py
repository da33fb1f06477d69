"""The caller's side of the multiplexed request plane (segue.mux has the wire and the
worker's side): one WebSocket per worker carries every call this process makes to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from segue.failures import Failure, FailureReason
from segue.mux import CALL_RECORD, MAX_MESSAGE, OP_RECORD, Op, Outbox

log = logging.getLogger("segue.mux")


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
        self.out = Outbox(ws)
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
        self.out.put(OP_RECORD.pack(Op.OPEN, call.sid, len(request)), request)
        return call

    def cancel(self, call: MuxCall) -> None:
        """The caller is done with a call before its end (left, or gave up on it)."""
        if self.calls.pop(call.sid, None) is not None and not self.out.closed:
            self.out.put(OP_RECORD.pack(Op.CANCEL, call.sid, 0))

    def detach(self, call: MuxCall) -> None:
        """The caller lets a detachable call go on without it (it is shutting down)."""
        if self.calls.pop(call.sid, None) is not None and not self.out.closed:
            self.out.put(OP_RECORD.pack(Op.DETACH, call.sid, 0))

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
            if n - pos < CALL_RECORD.size:
                return False
            sid, size = CALL_RECORD.unpack_from(data, pos)
            pos += CALL_RECORD.size
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
