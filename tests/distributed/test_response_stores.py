"""The response store's contract, on both stores (SQLite, and a real Redis server): an
owner's batches are written only while it owns the response, a silent one goes to exactly
one claimer, a cancel sticks while a finished response is left as it is, and responses
expire and are bounded."""

from __future__ import annotations

import asyncio

import pytest
from redis_server import Redis

from segue.frontend.redis_store import RedisStore
from segue.frontend.response_store import SqliteStore, Status, Write


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "r.db", ttl=60, max_responses=3, sweep_every=0)
        yield s
        asyncio.run(s.close())
        return
    server = Redis(tmp_path)
    try:
        yield RedisStore(server.url, ttl=60, max_responses=3)
    finally:
        server.stop()


def test_only_the_owner_writes_and_one_claimer_takes_a_silent_response(store):
    async def go():
        await store.create("r1", b"{}", b"[]", b"{}", Status.IN_PROGRESS, True, "a")
        events = [(0, b'{"type":"response.created"}')]
        assert await store.append("r1", "a", events, b"{}", Status.IN_PROGRESS, b"[1]") is Write.OK
        assert await store.append("r1", "b", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        assert not await store.claim("r1", "b", "a", stale_after=60)  # a beat just now
        assert not await store.claim("r1", "b", "z", stale_after=0)  # z does not own it
        await store.release("r1", "a")  # let go: claimable at once, by one claimer
        claims = await asyncio.gather(*(store.claim("r1", o, "a", 60) for o in "bc"))
        assert sorted(claims) == [False, True]
        winner = "b" if claims[0] else "c"
        assert await store.append("r1", "a", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        got = await store.get("r1")
        assert got.owner == winner and got.last_seq == 0 and got.tokens == b"[1]"
        assert [s for s, _ in await store.events("r1", -1)] == [0]

    run(store, go)


def test_a_batch_written_again_stores_each_event_once(store):
    """A batch whose write failed on the way back (it was stored) is sent again with the
    next one; a long batch (after the store was away a while) goes whole."""

    async def go():
        await store.create("r1", b"{}", b"[]", b"{}", Status.IN_PROGRESS, True, "a")
        ev = [(i, b'{"n":%d}' % i) for i in range(2500)]
        st = Status.IN_PROGRESS
        assert await store.append("r1", "a", ev[:3], b"{}", st, b"[]") is Write.OK
        assert await store.append("r1", "a", ev[1:5], b"{}", st, b"[]") is Write.OK
        assert await store.append("r1", "a", ev[5:], b"{}", st, b"[]") is Write.OK
        assert await store.events("r1", -1) == ev
        assert (await store.get("r1")).last_seq == 2499
        assert await store.events("r1", 2497) == ev[2498:]

    run(store, go)


def test_cancel_sticks_and_a_finished_response_is_left_as_it_is(store):
    async def go():
        await store.create("r1", b"{}", b"[]", b'{"status":"queued"}', Status.QUEUED, True, "a")
        mark = lambda r: b'{"status":"cancelled"}'  # noqa: E731
        assert (await store.cancel("r1", mark)).status is Status.CANCELLED
        assert await store.append("r1", "a", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        await store.create("r2", b"{}", b"[]", b"{}", Status.IN_PROGRESS, True, "a")
        await store.append("r2", "a", [], b'{"s":1}', Status.COMPLETED, b"[]")
        again = await store.cancel("r2", mark)
        assert again.status is Status.COMPLETED and again.response == b'{"s":1}'
        assert await store.cancel("nope", mark) is None

    run(store, go)


def test_expired_and_beyond_the_bound_are_gone(store):
    async def go():
        for i in range(4):  # max_responses 3: the oldest goes
            await store.create(f"r{i}", b"{}", b"[]", b"{}", Status.COMPLETED, False, "a")
        assert await store.get("r0") is None and await store.get("r3") is not None
        store.ttl = -1.0
        await store.create("late", b"{}", b"[]", b"{}", Status.COMPLETED, False, "a")
        assert await store.get("late") is None  # expired at once
        assert await store.get("r3") is not None  # kept for the ttl it was stored with

    run(store, go)


def run(store, go) -> None:
    """Runs `go` in a loop of its own; a Redis client's connections belong to that loop."""

    async def main() -> None:
        try:
            await go()
        finally:
            if isinstance(store, RedisStore):
                await store.close()

    asyncio.run(main())
