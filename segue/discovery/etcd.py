"""etcd discovery through etcd's JSON gateway (`/v3/...`), with the aiohttp client segue
already uses: no gRPC stack, no extra dependency.

Keys: `segue/<namespace>/instances/<id>` -> the JSON `Instance`, attached to the worker's
lease. A worker grants a lease, puts its key, and keeps the lease alive every ttl/3; if etcd
is unreachable it keeps serving and, once etcd answers again, re-registers (a new lease if the
old one expired). A watcher reads the whole prefix once (a snapshot at revision R), then
watches from R+1; after a reconnect (or a compaction past its revision) it takes a new
snapshot, so no change is lost even when etcd came back without its data. While etcd is down
a watcher keeps its last known view (a new snapshot replaces it once etcd answers): the
router's own failure handling covers workers that died meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from segue.discovery.base import Discovery, Instance, Lease

log = logging.getLogger("segue.discovery")
RETRY_S = 0.5  # between attempts while etcd is unreachable
TICK_S = 1.0  # a watcher's clock while no event comes
# How long workers stay in view after etcd came back without its data: they register again
# at their next renewal (every --lease-ttl/3, 3.3 s by default).
STALE_GRACE_S = 15.0
_TIMEOUT = aiohttp.ClientTimeout(total=3.0, sock_connect=1.0)


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with `prefix`."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b64(bytes(b))


class EtcdUnavailable(Exception):
    """No endpoint answered."""


class EtcdClient:
    """The few calls segue needs, over several endpoints (the first that answers wins)."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = [e if e.startswith("http") else f"http://{e}" for e in endpoints]
        self._current = 0
        self.session = aiohttp.ClientSession()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for i in range(len(self.endpoints)):
            url = self.endpoints[(self._current + i) % len(self.endpoints)]
            try:
                async with self.session.post(url + path, json=body, timeout=_TIMEOUT) as r:
                    data: dict[str, Any] = await r.json(content_type=None)
                    if r.status != 200:
                        raise EtcdUnavailable(f"{url}{path}: HTTP {r.status}: {data}")
                    self._current = (self._current + i) % len(self.endpoints)
                    return data
            except (aiohttp.ClientError, TimeoutError, ValueError, EtcdUnavailable) as e:
                last = e
        raise EtcdUnavailable(f"no etcd endpoint answered ({last})")

    async def watch(
        self, key: str, range_end: str, start_revision: int, tick: float = TICK_S
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The watch stream's results (JSON objects, one per message) from one endpoint, in
        batches of what has arrived together: a registration storm of a thousand workers
        is a few batches, not a thousand views of the fleet to rebuild. An empty batch
        every `tick` seconds without any (the caller's clock)."""
        url = self.endpoints[self._current]
        body = {
            "create_request": {
                "key": b64(key),
                "range_end": range_end,
                "start_revision": str(start_revision),
            }
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0)
        try:
            async with self.session.post(url + "/v3/watch", json=body, timeout=timeout) as r:
                rest = b""
                while True:
                    try:
                        chunk = await asyncio.wait_for(r.content.readany(), tick)
                    except TimeoutError:
                        yield []
                        continue
                    if not chunk:  # the stream ended
                        return
                    *lines, rest = (rest + chunk).split(b"\n")
                    batch = [json.loads(line) for line in lines if line.strip()]
                    if batch:
                        yield batch
        except (aiohttp.ClientError, ValueError) as e:
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdUnavailable(f"watch on {url} broke: {e}") from None

    async def close(self) -> None:
        await self.session.close()


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Instance)


class _EtcdLease(Lease):
    def __init__(self, client: EtcdClient, key: str, instance: Instance, ttl: float) -> None:
        self.client, self.key, self.instance, self.ttl = client, key, instance, ttl
        self.lease_id: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def _register(self) -> None:
        grant = await self.client.call("/v3/lease/grant", {"TTL": str(max(1, round(self.ttl)))})
        self.lease_id = grant["ID"]
        await self.client.call(
            "/v3/kv/put",
            {
                "key": b64(self.key),
                "value": b64(_enc.encode(self.instance)),
                "lease": self.lease_id,
            },
        )

    async def _keep_alive(self) -> bool:
        """True while the lease lives; False once etcd says it expired."""
        res = await self.client.call("/v3/lease/keepalive", {"ID": self.lease_id})
        return int(res.get("result", {}).get("TTL", 0)) > 0

    async def _run(self) -> None:
        registered = self.lease_id is not None
        while True:
            try:
                if not registered:
                    await self._register()
                    log.info("registered in etcd (lease %s)", self.lease_id)
                    registered = True
                elif not await self._keep_alive():
                    log.warning("etcd lease %s expired: registering again", self.lease_id)
                    registered = False
                    continue
            except EtcdUnavailable as e:
                log.warning("etcd unreachable (%s): serving on, retrying", e)
                await asyncio.sleep(RETRY_S)
                continue
            await asyncio.sleep(self.ttl / 3)

    async def start(self) -> None:
        """Registers now if etcd answers; keeps trying in the background if not."""
        with contextlib.suppress(EtcdUnavailable):
            await self._register()
        if self.lease_id is None:
            log.warning("etcd unreachable at start: serving, will register when it answers")
        self._task = asyncio.create_task(self._run(), name="etcd-lease")

    async def revoke(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.lease_id is not None:
            with contextlib.suppress(EtcdUnavailable):
                await self.client.call("/v3/lease/revoke", {"ID": self.lease_id})
            self.lease_id = None


class EtcdDiscovery(Discovery):
    def __init__(self, endpoints: list[str], namespace: str) -> None:
        self.client = EtcdClient(endpoints)
        self.prefix = f"segue/{namespace}/instances/"

    async def register(self, instance: Instance, ttl: float) -> Lease:
        lease = _EtcdLease(self.client, self.prefix + instance.id, instance, ttl)
        await lease.start()
        return lease

    async def snapshot(self) -> tuple[dict[str, Instance], int]:
        res = await self.client.call(
            "/v3/kv/range", {"key": b64(self.prefix), "range_end": prefix_end(self.prefix)}
        )
        live: dict[str, Instance] = {}
        for kv in res.get("kvs", []):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                inst = _dec.decode(base64.b64decode(kv["value"]))
                live[inst.id] = inst
        return live, int(res["header"]["revision"])

    async def watch(self) -> AsyncIterator[dict[str, Instance]]:
        live: dict[str, Instance] | None = None
        rev = 0  # of the last change under our prefix: where a watch resumes
        seen = 0  # the highest store revision etcd has told us of
        warned = False
        # Workers of a view from before etcd lost its data, kept until they register again
        # or until `stale_until`: without them the fleet would vanish until every worker's
        # next renewal found its lease gone (503s meanwhile).
        stale: dict[str, Instance] = {}
        stale_until = 0.0
        known: dict[str, Instance] = {}  # the view before the last reconnect
        loop = asyncio.get_running_loop()
        while True:
            try:
                if live is None:
                    before, before_rev = known, max(rev, seen)
                    live, rev = await self.snapshot()
                    seen = rev
                    if before and rev < before_rev:  # its revisions started again
                        stale = {k: v for k, v in before.items() if k not in live}
                        stale_until = loop.time() + STALE_GRACE_S
                        log.warning(
                            "etcd came back without its data (revision %d after %d): "
                            "keeping %d workers for %g s while they register again",
                            rev,
                            before_rev,
                            len(stale),
                            STALE_GRACE_S,
                        )
                    known = live
                    yield {**stale, **live}
                stream = self.client.watch(self.prefix, prefix_end(self.prefix), rev + 1)
                async for batch in stream:
                    changed = False
                    if stale and loop.time() >= stale_until:
                        log.info("dropping %d workers that did not register again", len(stale))
                        stale, changed = {}, True
                    for msg in batch:
                        result = msg.get("result", {})
                        if int(result.get("compact_revision", 0) or 0) > rev:
                            raise EtcdUnavailable("our revision was compacted away")
                        # the store's revision then: what a store without its data is below
                        seen = max(seen, int(result.get("header", {}).get("revision", 0)))
                        for ev in result.get("events", []):
                            changed |= self._apply(live, ev, stale)
                            rev = max(rev, int(ev["kv"].get("mod_revision", rev)))
                    if changed:
                        yield {**stale, **live}
                    warned = False
                raise EtcdUnavailable("watch stream ended")
            except EtcdUnavailable as e:
                # Start again from a snapshot, not from our revision: an etcd restarted
                # without its data counts revisions from 1 again, and a watch from ours
                # would miss every registration until the counter caught up.
                live = None
                if not warned:
                    log.warning("etcd unreachable (%s): keeping the last known workers", e)
                    warned = True
                await asyncio.sleep(RETRY_S)

    def _apply(
        self, live: dict[str, Instance], ev: dict[str, Any], stale: dict[str, Instance]
    ) -> bool:
        """One watch event applied to `live` (a worker seen again is no longer stale);
        whether it changed."""
        kv = ev["kv"]
        iid = base64.b64decode(kv["key"]).decode()[len(self.prefix) :]
        stale.pop(iid, None)
        if ev.get("type") == "DELETE":
            return live.pop(iid, None) is not None
        try:
            live[iid] = _dec.decode(base64.b64decode(kv["value"]))
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return True

    async def close(self) -> None:
        await self.client.close()
