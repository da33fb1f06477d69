"""Picks a worker for each call.

Policies: round-robin, random, least-loaded (fewest calls in flight from this process), and
kv: the worker with the lowest cost, `--kv-overlap-weight` x the context tokens it would
have to prefill (what its prefix cache lacks, from the KV index) + `--kv-load-weight` x the
context tokens of the calls this process has in flight on it; ties go to fewer calls in
flight, then round-robin.

The live set comes from discovery. A worker whose call failed (refused, broken stream,
stall) is taken out of rotation at once and comes back only when a health probe answers
and discovery still lists it; if discovery drops it, it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from enum import StrEnum

import aiohttp

from segue.discovery import Instance
from segue.protocol import Role, Route
from segue.router.kv_follow import KvFollower
from segue.router.kv_index import KvIndex

log = logging.getLogger("segue.router")
PROBE_INTERVAL = 0.25


class Policy(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"
    KV = "kv"


class Router:
    def __init__(
        self,
        policy: Policy = Policy.ROUND_ROBIN,
        session: aiohttp.ClientSession | None = None,
        kv_overlap_weight: float = 1.0,
        kv_load_weight: float = 0.1,
    ) -> None:
        self.policy = Policy(policy)
        self.instances: dict[str, Instance] = {}
        self.down: set[str] = set()
        self.inflight: dict[str, int] = {}
        self.load_tokens: dict[str, int] = {}  # context tokens of the calls in flight
        self.kv_index = KvIndex()
        self.kv_weights = (kv_overlap_weight, kv_load_weight)
        self._follower = (
            KvFollower(session, self.kv_index)
            if self.policy is Policy.KV and session is not None
            else None
        )
        self._rr = itertools.count()
        self._session = session
        self._probes: dict[str, asyncio.Task[None]] = {}

    def update(self, instances: dict[str, Instance]) -> None:
        for gone in self.instances.keys() - instances.keys():
            log.info("worker %s left discovery", gone)
            self.down.discard(gone)
            if not self.inflight.get(gone):  # else the last call out removes it
                self.inflight.pop(gone, None)
                self.load_tokens.pop(gone, None)
            task = self._probes.pop(gone, None)
            if task:
                task.cancel()
        for new in instances.keys() - self.instances.keys():
            log.info("worker %s joined (%s, %s)", new, instances[new].role, instances[new].url)
        self.instances = instances
        if self._follower is not None:
            self._follower.sync(instances)

    @property
    def wants_tokens(self) -> bool:
        """Whether `pick` uses the request's tokens (worth passing them)."""
        return self.policy is Policy.KV

    def routable(self, role: Role | None = None, model: str | None = None) -> list[Instance]:
        return [
            i
            for i in self.instances.values()
            if i.id not in self.down
            and (role is None or i.role == role)
            and (model is None or i.card.name == model)
        ]

    def pick(
        self,
        roles: Iterable[Role],
        exclude: Iterable[str] = (),
        model: str | None = None,
        tokens: list[int] | None = None,
    ) -> Instance | None:
        """A worker of one of `roles` (serving `model`, when given) that is in rotation and
        not in `exclude`; `tokens` (the call's context) for the kv policy."""
        wanted = set(roles)
        cands = [
            i
            for i in self.instances.values()
            if i.role in wanted
            and i.id not in self.down
            and i.id not in exclude
            and (model is None or i.card.name == model)
        ]
        if not cands:
            return None
        if self.policy is Policy.RANDOM:
            return random.choice(cands)
        if self.policy is Policy.KV and tokens is not None and len(cands) > 1:
            cands = self._cheapest(cands, tokens)
        if self.policy in (Policy.LEAST_LOADED, Policy.KV):
            low = min(self.inflight.get(i.id, 0) for i in cands)
            cands = [i for i in cands if self.inflight.get(i.id, 0) == low]
        return cands[next(self._rr) % len(cands)]

    def _cheapest(self, cands: list[Instance], tokens: list[int]) -> list[Instance]:
        cached = self.kv_index.overlap(tokens, [i.id for i in cands])
        w_prefill, w_load = self.kv_weights
        n = len(tokens)
        costs = [
            w_prefill * (n - cached[i.id]) + w_load * self.load_tokens.get(i.id, 0) for i in cands
        ]
        low = min(costs)
        return [i for i, c in zip(cands, costs, strict=True) if c == low]

    @contextlib.contextmanager
    def track(self, instance: Instance, tokens: int = 0) -> Iterator[None]:
        """Counts a call in flight on a worker, and the context tokens it holds there (for
        least-loaded and kv)."""
        wid = instance.id
        self.inflight[wid] = self.inflight.get(wid, 0) + 1
        self.load_tokens[wid] = self.load_tokens.get(wid, 0) + tokens
        try:
            yield
        finally:
            self.inflight[wid] -= 1
            self.load_tokens[wid] -= tokens
            if not self.inflight[wid] and wid not in self.instances:  # it left meanwhile
                del self.inflight[wid], self.load_tokens[wid]

    def mark_down(self, instance: Instance, reason: str) -> None:
        if instance.id in self.down or instance.id not in self.instances:
            return
        log.warning("worker %s out of rotation: %s", instance.id, reason)
        self.down.add(instance.id)
        if self._session is not None:
            self._probes[instance.id] = asyncio.create_task(self._probe(instance))

    async def _probe(self, instance: Instance) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=1.0)
        while instance.id in self.down:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with self._session.get(instance.url + Route.HEALTH, timeout=timeout) as r:
                    ok = r.status == 200 and (await r.json()).get("status") == "ok"
            except (aiohttp.ClientError, TimeoutError, ValueError):
                ok = False
            if ok and instance.id in self.instances:
                log.info("worker %s back in rotation", instance.id)
                self.down.discard(instance.id)
        self._probes.pop(instance.id, None)

    async def close(self) -> None:
        for t in self._probes.values():
            t.cancel()
        if self._follower is not None:
            await self._follower.close()
