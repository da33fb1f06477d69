"""Picks a worker for each call, with the policy `--router` names (the table and what each
does: router/policies.py).

The live set comes from discovery. A worker whose call failed (refused, broken stream,
stall) is taken out of rotation at once and comes back only when a health probe answers
and discovery still lists it; if discovery drops it, it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator

import aiohttp

from segue import health
from segue.discovery import Instance
from segue.protocol import Role, Route
from segue.router.candidates import Candidates
from segue.router.kv_follow import KvFollower
from segue.router.kv_index import KvIndex
from segue.router.loads import Loads
from segue.router.policies import POLICIES, Policy

__all__ = ["Policy", "Router"]

log = logging.getLogger("segue.router")
PROBE_INTERVAL = 0.25


class Router:
    def __init__(
        self,
        policy: Policy = Policy.ROUND_ROBIN,
        session: aiohttp.ClientSession | None = None,
        kv_overlap_weight: float = 1.0,
        kv_load_weight: float = 0.1,
    ) -> None:
        self.policy = Policy(policy)
        spec = POLICIES[self.policy]
        self.instances: dict[str, Instance] = {}
        self.down: set[str] = set()
        self.loads = Loads(kv_weights=(kv_overlap_weight, kv_load_weight))
        self.inflight = self.loads.inflight
        self.load_tokens = self.loads.load_tokens  # context tokens of the calls in flight
        self.kv_index: KvIndex = self.loads.kv_index
        self._chooser = spec.make(self.loads)
        self._wants_tokens = spec.wants_tokens
        self._follower = (
            KvFollower(session, self.kv_index) if spec.follows_kv and session is not None else None
        )
        self._session = session
        self._probes: dict[str, asyncio.Task[None]] = {}
        # (roles, model) -> the workers in rotation for it: a pick reads a list made once
        # per change of the routable set, not a scan of every worker.
        self._cands: dict[tuple[frozenset[Role], str | None], Candidates | None] = {}
        self.on_change: Callable[[], None] = lambda: None  # the routable set changed

    def _changed(self) -> None:
        self._cands.clear()
        self.on_change()

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
        if self._follower is not None:
            self._follower.sync(instances)
        self._changed()

    @property
    def wants_tokens(self) -> bool:
        """Whether `pick` uses the request's tokens (worth passing them)."""
        return self._wants_tokens

    def routable(self, role: Role | None = None, model: str | None = None) -> list[Instance]:
        return [
            i
            for i in self.instances.values()
            if i.id not in self.down
            and (role is None or i.role == role)
            and (model is None or i.card.name == model)
        ]

    def _candidates(self, roles: frozenset[Role], model: str | None) -> Candidates | None:
        """The workers in rotation of `roles` (serving `model`), made once per change."""
        key = (roles, model)
        if key in self._cands:
            return self._cands[key]
        items = [
            i
            for i in self.instances.values()
            if i.role in roles and i.id not in self.down and (model is None or i.card.name == model)
        ]
        cands = self._cands[key] = Candidates.of(items) if items else None
        return cands

    def can_pick(self, role: Role, model: str | None = None) -> bool:
        """Whether a worker of `role` serving `model` is in rotation (no scan per call)."""
        return self._candidates(frozenset((role,)), model) is not None

    def pick(
        self,
        roles: Iterable[Role],
        exclude: Iterable[str] = (),
        model: str | None = None,
        tokens: list[int] | None = None,
    ) -> Instance | None:
        """A worker of one of `roles` (serving `model`, when given) that is in rotation and
        not in `exclude`; `tokens` (the call's context) for the kv policy."""
        cands = self._candidates(frozenset(roles), model)
        if cands is not None and exclude:  # a retry: rare, so made afresh
            skip = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
            if not skip.isdisjoint(cands.by_id):
                items = [i for i in cands.items if i.id not in skip]
                cands = Candidates.of(items) if items else None
        if cands is None:
            return None
        return self._chooser.choose(cands, tokens if self._wants_tokens else None)

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
            # Only busy workers have entries: the policies' work grows with them.
            left = self.inflight[wid] - 1
            if left:
                self.inflight[wid] = left
                self.load_tokens[wid] -= tokens
            else:
                del self.inflight[wid], self.load_tokens[wid]

    def mark_down(self, instance: Instance, reason: str, process_gone: bool = False) -> None:
        """Out of rotation until a health probe answers; `process_gone` (its connection was
        refused or broke): its siblings in the same process too (a host of a simulated
        fleet dies as one)."""
        if instance.id in self.down or instance.id not in self.instances:
            return
        log.warning("worker %s out of rotation: %s", instance.id, reason)
        struck = [instance]
        if process_gone and instance.process:
            struck += [
                i
                for i in self.instances.values()
                if i.process == instance.process and i.id not in self.down and i is not instance
            ]
            if len(struck) > 1:
                log.warning("%d workers of its process out of rotation too", len(struck) - 1)
        for i in struck:
            self.down.add(i.id)
            if self._session is not None:
                self._probes[i.id] = asyncio.create_task(self._probe(i))
        self._changed()

    async def _probe(self, instance: Instance) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=1.0)
        while instance.id in self.down:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                async with self._session.get(instance.url + Route.HEALTH, timeout=timeout) as r:
                    body = health.decode_worker(await r.read()) if r.status == 200 else None
                ok = body is not None and body.status is health.WorkerStatus.OK
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok and instance.id in self.instances:
                log.info("worker %s back in rotation", instance.id)
                self.down.discard(instance.id)
                self._changed()
        self._probes.pop(instance.id, None)

    async def close(self) -> None:
        for t in self._probes.values():
            t.cancel()
        if self._follower is not None:
            await self._follower.close()
