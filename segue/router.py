"""Picks a worker for each call.

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

log = logging.getLogger("segue.router")
PROBE_INTERVAL = 0.25


class Policy(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"


class Router:
    def __init__(
        self, policy: Policy = Policy.ROUND_ROBIN, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.policy = Policy(policy)
        self.instances: dict[str, Instance] = {}
        self.down: set[str] = set()
        self.inflight: dict[str, int] = {}
        self._rr = itertools.count()
        self._session = session
        self._probes: dict[str, asyncio.Task[None]] = {}

    def update(self, instances: dict[str, Instance]) -> None:
        for gone in self.instances.keys() - instances.keys():
            log.info("worker %s left discovery", gone)
            self.down.discard(gone)
            task = self._probes.pop(gone, None)
            if task:
                task.cancel()
        for new in instances.keys() - self.instances.keys():
            log.info("worker %s joined (%s, %s)", new, instances[new].role, instances[new].url)
        self.instances = instances

    def routable(self, role: Role | None = None, model: str | None = None) -> list[Instance]:
        return [
            i
            for i in self.instances.values()
            if i.id not in self.down
            and (role is None or i.role == role)
            and (model is None or i.card.name == model)
        ]

    def pick(
        self, roles: Iterable[Role], exclude: Iterable[str] = (), model: str | None = None
    ) -> Instance | None:
        """A worker of one of `roles` (serving `model`, when given) that is in rotation and
        not in `exclude`."""
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
        if self.policy is Policy.LEAST_LOADED:
            low = min(self.inflight.get(i.id, 0) for i in cands)
            cands = [i for i in cands if self.inflight.get(i.id, 0) == low]
        return cands[next(self._rr) % len(cands)]

    @contextlib.contextmanager
    def track(self, instance: Instance) -> Iterator[None]:
        """Counts a call in flight on a worker (for least-loaded)."""
        self.inflight[instance.id] = self.inflight.get(instance.id, 0) + 1
        try:
            yield
        finally:
            self.inflight[instance.id] -= 1

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
