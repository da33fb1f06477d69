"""A worker's KV event stream followed by a frontend's index, in one process: snapshot on
connect, batches in order, a gap answered by a resync, and the blocks dropped when the
stream ends."""

from __future__ import annotations

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from harness_async import wait_for

from segue.discovery import Instance
from segue.protocol import Role, Route
from segue.router.kv_follow import KvFollower
from segue.router.kv_index import KvIndex
from segue.worker.kv_events import KvEventLog


def _held(index: KvIndex, wid: str) -> set[int] | None:
    w = index.workers.get(wid)
    return None if w is None else w.blocks


async def test_follower_keeps_the_index_equal_to_the_workers_cache_through_a_gap():
    log = KvEventLog()
    log.start(block_size=16, capacity=100, blocks=[1, 2])
    app = web.Application()
    app.router.add_get(Route.KV_EVENTS, log.serve)
    server = TestServer(app)
    await server.start_server()
    index = KvIndex()
    async with aiohttp.ClientSession() as session:
        follower = KvFollower(session, index)
        url = str(server.make_url("")).rstrip("/")
        follower.sync({"w": Instance(id="w", role=Role.AGGREGATED, url=url, pid=0, host="h")})
        await wait_for(lambda: _held(index, "w") == {1, 2}, what="the snapshot")
        log.stored([3, 4])
        log.removed([1])
        await wait_for(lambda: _held(index, "w") == {2, 3, 4}, what="two batches")
        assert index.workers["w"].seq == log.seq == 2
        log.seq += 1  # a batch this subscriber never got (as when it read too slowly)
        log.removed([2])
        log.stored([5])  # the index missed nothing it can see, but must resync
        await wait_for(lambda: index.workers["w"].seq == log.seq, what="the resync")
        assert _held(index, "w") == {3, 4, 5} == log.blocks
        follower.sync({})  # the worker left discovery
        assert _held(index, "w") is None and index.holders == {}
        await follower.close()
    await server.close()
