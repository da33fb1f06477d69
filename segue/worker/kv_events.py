"""KV events: what a worker's engine caches and evicts, published to every frontend that
follows it (GET /kv_events, a WebSocket), for KV-aware routing (segue.router.kv_index).

A subscriber first gets a `KvSnapshot`, then `KvEvents` batches numbered one by one (one
batch per engine step at most). A subscriber that reads too slowly loses batches instead of
growing a queue without bound; it sees the gap in the numbers and sends RESYNC for a new
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import msgspec
from aiohttp import web

from segue.protocol import RESYNC, KvEvents, KvSnapshot

log = logging.getLogger("segue.worker")
_QUEUE = 1024  # batches a subscriber may fall behind before it loses some
_encode = msgspec.msgpack.Encoder().encode


class KvEventLog:
    """Implements the engine side's `KvEvents` sink (segue.engines.seqtable)."""

    def __init__(self) -> None:
        self.block_size = 0
        self.capacity = 0
        self.blocks: set[int] = set()
        self.seq = 0
        self._stored: list[int] = []
        self._removed: list[int] = []
        self._scheduled = False
        self.subscribers: set[asyncio.Queue[bytes]] = set()
        self._sockets: set[web.WebSocketResponse] = set()

    def start(self, block_size: int, capacity: int, blocks: list[int]) -> None:
        """The engine's cache as it is when it starts publishing."""
        self.block_size, self.capacity, self.blocks = block_size, capacity, set(blocks)

    def stored(self, hashes: list[int]) -> None:
        if self._removed:  # keep order: a batch holds one kind of event
            self._flush()
        self.blocks.update(hashes)
        self._stored += hashes
        self._schedule()

    def removed(self, hashes: list[int]) -> None:
        if self._stored:
            self._flush()
        self.blocks.difference_update(hashes)
        self._removed += hashes
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._stored and not self._removed:
            return
        self.seq += 1
        data = _encode(KvEvents(self.seq, self._stored, self._removed))
        self._stored, self._removed = [], []
        for q in self.subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(data)  # dropped: the subscriber will see a gap

    def snapshot(self) -> bytes:
        self._flush()
        return _encode(KvSnapshot(self.seq, self.block_size, self.capacity, list(self.blocks)))

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        queue: asyncio.Queue[bytes] = asyncio.Queue(_QUEUE)
        self.subscribers.add(queue)
        queue.put_nowait(self.snapshot())

        async def send() -> None:
            while True:
                await ws.send_bytes(await queue.get())

        sender = asyncio.create_task(send())
        self._sockets.add(ws)
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY and msg.data == RESYNC:
                    while not queue.empty():  # the snapshot covers them
                        queue.get_nowait()
                    queue.put_nowait(self.snapshot())
                else:
                    break
        finally:
            self._sockets.discard(ws)
            self.subscribers.discard(queue)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        return ws

    async def close(self) -> None:
        """Shutdown: end every subscription (the frontends drop this worker's blocks)."""
        await asyncio.gather(*(ws.close() for ws in list(self._sockets)), return_exceptions=True)
