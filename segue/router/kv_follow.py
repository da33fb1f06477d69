"""Follows the KV events of every worker in discovery (GET /kv_events) into one KvIndex.

A connection starts with a snapshot; a gap in the batch numbers asks for a new one. When a
worker's stream breaks, or the worker leaves discovery, its blocks leave the index (routing
then treats it as caching nothing until a new snapshot arrives). Each frontend process keeps
its own index from the same events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import msgspec

from segue.discovery import Instance
from segue.mux import MAX_MESSAGE
from segue.protocol import RESYNC, KvMessage, KvSnapshot, Route
from segue.router.kv_index import KvIndex

log = logging.getLogger("segue.router")
RECONNECT_S = 0.5  # pause before following a worker again after its stream broke
_decode = msgspec.msgpack.Decoder(KvMessage).decode


class KvFollower:
    def __init__(self, session: aiohttp.ClientSession, index: KvIndex) -> None:
        self.session = session
        self.index = index
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def sync(self, instances: dict[str, Instance]) -> None:
        for gone in self._tasks.keys() - instances.keys():
            self._tasks.pop(gone).cancel()
            self.index.remove(gone)
        for wid in instances.keys() - self._tasks.keys():
            self._tasks[wid] = asyncio.create_task(self._follow(instances[wid]))

    async def _follow(self, inst: Instance) -> None:
        while True:
            try:
                await self._stream(inst)
            except aiohttp.WSServerHandshakeError as e:
                if e.status == 404:
                    log.info("worker %s publishes no KV events (no prefix cache)", inst.id)
                    return
            except (aiohttp.ClientError, OSError, msgspec.DecodeError, msgspec.ValidationError):
                pass
            finally:
                self.index.remove(inst.id)
            await asyncio.sleep(RECONNECT_S)

    async def _stream(self, inst: Instance) -> None:
        async with self.session.ws_connect(
            inst.url + Route.KV_EVENTS, compress=0, max_msg_size=MAX_MESSAGE
        ) as ws:
            synced = False  # until a snapshot arrives
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    return
                m = _decode(msg.data)
                if type(m) is KvSnapshot:
                    self.index.snapshot(inst.id, m)
                    synced = True
                elif synced and not self.index.apply(inst.id, m):
                    synced = False
                    await ws.send_bytes(RESYNC)

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
