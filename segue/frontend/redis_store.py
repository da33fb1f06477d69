"""The response store on Redis (`--store redis://HOST:PORT/DB`), for frontends on several
machines: the same contract as the SQLite store (response_store.py).

A response is a hash (`segue:r:ID`) and its events a list (`segue:e:ID`, an event's
sequence number is its index); both expire `ttl` seconds after the response was made, and
`segue:index` (a sorted set by creation time) keeps at most `max_responses` (oldest out).
Each guarded write (an owner's batch, a claim, a release) is one Lua script, atomic in
Redis; a cancel is a WATCH transaction. Every call has a socket timeout: with Redis down, a
request that needs the store gets StoreError (a 503 naming the store) within it, never a
hang.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from segue.frontend.response_store import MAX_RESPONSES, Status, Stored, StoreError, Write

T = TypeVar("T")
TIMEOUT_S = 2.0  # a Redis call that takes longer fails

_APPEND = """
local st = redis.call('HMGET', KEYS[1], 'status', 'owner')
if not st[1] or st[2] ~= ARGV[1] or (st[1] ~= 'queued' and st[1] ~= 'in_progress') then
  return 0
end
local first = tonumber(ARGV[6])
local i = 8
if #ARGV >= 8 then
  i = math.max(8, 8 + redis.call('LLEN', KEYS[2]) - first)  -- skip what is stored
end
while i <= #ARGV do  -- one RPUSH per 1000 events (unpack's stack is bounded)
  local j = math.min(#ARGV, i + 999)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
if #ARGV >= 8 then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'response', ARGV[3], 'tokens', ARGV[4],
             'heartbeat', ARGV[5], 'worker', ARGV[7], 'last_seq', first + #ARGV - 8)
  redis.call('PEXPIRE', KEYS[2], redis.call('PTTL', KEYS[1]))
else
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'response', ARGV[3], 'tokens', ARGV[4],
             'heartbeat', ARGV[5], 'worker', ARGV[7])
end
return 1
"""

_CLAIM = """
local st = redis.call('HMGET', KEYS[1], 'status', 'heartbeat', 'owner')
if not st[1] or (st[1] ~= 'queued' and st[1] ~= 'in_progress') then return 0 end
if st[3] ~= ARGV[4] then return 0 end
if tonumber(st[2]) > tonumber(ARGV[2]) - tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'heartbeat', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'heartbeat', 0)
end
return 1
"""

_FIELDS = (
    "status",
    "background",
    "request",
    "input_items",
    "response",
    "tokens",
    "worker",
    "last_seq",
    "owner",
    "heartbeat",
)


class RedisStore:
    def __init__(self, url: str, ttl: float, max_responses: int = MAX_RESPONSES) -> None:
        import redis.asyncio as redis

        self.url = url
        self.ttl = ttl
        self.max_responses = max_responses
        self.writes = 0
        self._errors = (redis.RedisError, OSError)
        self._watch_error = redis.WatchError
        # bytes in, bytes out (no decode_responses): typed Any, redis-py's types are str|bytes
        self.r: Any = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
        )
        self._append = self.r.register_script(_APPEND)
        self._claim = self.r.register_script(_CLAIM)
        self._release = self.r.register_script(_RELEASE)

    @staticmethod
    def _keys(rid: str) -> tuple[str, str]:
        return f"segue:r:{rid}", f"segue:e:{rid}"

    async def _run(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except self._errors as e:
            raise StoreError(f"the response store ({self.url}) failed: {e}") from None

    async def close(self) -> None:
        await self.r.aclose()

    async def create(
        self,
        rid: str,
        request: bytes,
        input_items: bytes,
        response: bytes,
        status: Status,
        background: bool,
        owner: str,
    ) -> None:
        now = time.time()
        r, _ = self._keys(rid)
        fields = {
            "status": status.value,
            "background": int(background),
            "request": request,
            "input_items": input_items,
            "response": response,
            "tokens": b"[]",
            "worker": "",
            "last_seq": -1,
            "owner": owner,
            "heartbeat": now,
        }

        async def create() -> None:
            p = self.r.pipeline(transaction=True)
            p.hset(r, mapping=fields)
            p.pexpire(r, int(self.ttl * 1000))  # <= 0: gone at once
            p.zadd("segue:index", {rid: now})
            p.zremrangebyscore("segue:index", "-inf", now - self.ttl)
            p.zcard("segue:index")
            *_, count = await p.execute()
            if count > self.max_responses:
                old = await self.r.zpopmin("segue:index", count - self.max_responses)
                ids = [i.decode() for i, _ in old]
                if ids:
                    await self.r.delete(*[k for i in ids for k in self._keys(i)])
            self.writes += 1

        await self._run(create())

    async def append(
        self,
        rid: str,
        owner: str,
        events: list[tuple[int, bytes]],
        response: bytes,
        status: Status,
        tokens: bytes,
        worker: str = "",
    ) -> Write:
        first = events[0][0] if events else 0
        args: list[Any] = [owner, status.value, response, tokens, time.time(), first, worker]
        args += [d for _, d in events]
        ok = await self._run(self._append(keys=list(self._keys(rid)), args=args))
        self.writes += 1
        return Write.OK if ok else Write.LOST

    async def finish(self, rid: str, response: bytes, status: Status) -> None:
        r, _ = self._keys(rid)
        await self._run(self.r.hset(r, mapping={"status": status.value, "response": response}))
        self.writes += 1

    async def claim(self, rid: str, owner: str, was: str, stale_after: float) -> bool:
        r, _ = self._keys(rid)
        args: list[Any] = [owner, time.time(), stale_after, was]
        ok = await self._run(self._claim(keys=[r], args=args))
        return bool(ok)

    async def release(self, rid: str, owner: str) -> None:
        r, _ = self._keys(rid)
        await self._run(self._release(keys=[r], args=[owner]))

    async def cancel(self, rid: str, response: Callable[[bytes], bytes]) -> Stored | None:
        r, _ = self._keys(rid)

        async def cancel() -> None:
            async with self.r.pipeline(transaction=True) as p:
                while True:
                    try:
                        await p.watch(r)
                        status, body = await p.hmget(r, ["status", "response"])
                        if status is None or not Status(status.decode()).running:
                            await p.unwatch()
                            return
                        p.multi()
                        p.hset(r, mapping={"status": "cancelled", "response": response(body)})
                        await p.execute()
                        self.writes += 1
                        return
                    except self._watch_error:
                        continue  # its owner wrote meanwhile: read again

        await self._run(cancel())
        return await self.get(rid)

    async def delete(self, rid: str) -> bool:
        r, e = self._keys(rid)
        p = self.r.pipeline(transaction=True)
        p.delete(r)
        p.delete(e)
        p.zrem("segue:index", rid)
        gone, *_ = await self._run(p.execute())
        return bool(gone)

    async def get(self, rid: str) -> Stored | None:
        r, _ = self._keys(rid)
        values = await self._run(self.r.hmget(r, list(_FIELDS)))
        if values[0] is None:
            return None
        v = dict(zip(_FIELDS, values, strict=True))
        return Stored(
            rid,
            Status(v["status"].decode()),
            v["background"] == b"1",
            v["request"],
            v["input_items"],
            v["response"],
            v["tokens"],
            v["worker"].decode(),
            int(v["last_seq"]),
            v["owner"].decode(),
            float(v["heartbeat"]),
        )

    async def events(self, rid: str, after: int) -> list[tuple[int, bytes]]:
        _, e = self._keys(rid)
        rows = await self._run(self.r.lrange(e, after + 1, -1))
        return [(after + 1 + i, d) for i, d in enumerate(rows)]
