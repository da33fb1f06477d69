"""The table of routing policies: each `--router` name, a factory of its `Chooser` (the one
small protocol a policy implements) and what it needs of the router. Adding a policy: a
module with its chooser, a name and a row here (power_of_two.py is one).

round-robin   in turn (a turn per role)
random        uniformly at random
least-loaded  fewest calls in flight from this process; ties in turn
kv            lowest cost: `--kv-overlap-weight` x the context tokens the worker would have
              to prefill (what its prefix cache lacks, from the KV index) + `--kv-load-weight`
              x the context tokens of the calls this process has in flight on it; ties to
              fewer calls in flight, then in turn
power-of-two  two workers at random, the one with fewer calls in flight
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Container
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from segue.discovery import Instance
from segue.router.candidates import Candidates
from segue.router.loads import Loads
from segue.router.power_of_two import PowerOfTwo


class Chooser(Protocol):
    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        """One of `cands`; `tokens`: the call's context, when the policy wants it. A fleet
        has many idle workers: a policy's work should grow with the calls in flight and the
        workers that cache the prompt, not with the fleet."""
        ...


class Policy(StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"
    KV = "kv"
    POWER_OF_TWO = "power-of-two"


class RoundRobin:
    """A turn per role: with one counter, a disaggregated request's prefill pick and its
    decode pick would advance it alike, and every decode could land on one worker."""

    def __init__(self, loads: Loads) -> None:
        self._next: dict[str, itertools.count[int]] = {}

    def turn(self, cands: list[Instance]) -> int:
        return next(self._next.setdefault(cands[0].role, itertools.count()))

    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        return cands.items[self.turn(cands.items) % len(cands.items)]


class Random:
    def __init__(self, loads: Loads) -> None:
        pass

    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        return random.choice(cands.items)


class LeastLoaded(RoundRobin):
    """`loads.inflight` holds only the workers with calls in flight, so an idle candidate
    is found by walking the list from this turn's place past the busy ones: as many steps
    as there are busy workers at most, whatever the fleet's size."""

    def __init__(self, loads: Loads) -> None:
        super().__init__(loads)
        self.loads = loads
        self._after: dict[str, int] = {}  # role -> the place after its last idle pick

    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        idle = self.idle(cands.items, ())
        return idle if idle is not None else self.fewest(cands.items)

    def idle(self, cands: list[Instance], skip: Container[str]) -> Instance | None:
        """The next candidate in turn with no call in flight (and not in `skip`)."""
        inflight = self.loads.inflight
        n = len(cands)
        role = cands[0].role
        start = self._after.get(role, 0)
        for k in range(n):
            j = (start + k) % n
            i = cands[j]
            if i.id not in inflight and i.id not in skip:
                self._after[role] = j + 1
                return i
        return None

    def fewest(self, cands: list[Instance]) -> Instance:
        """Fewest calls in flight, ties in turn (every candidate busy: as many as calls)."""
        inflight = self.loads.inflight
        low = min(inflight.get(i.id, 0) for i in cands)
        ties = [i for i in cands if inflight.get(i.id, 0) == low]
        return ties[self.turn(cands) % len(ties)]


class KvCost(LeastLoaded):
    """Costs only the workers that cache part of the prompt, the busy ones, and one idle
    worker that caches nothing (every such worker costs the same: the whole prompt)."""

    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        if tokens is None or len(cands.items) == 1:
            return super().choose(cands, tokens)
        loads = self.loads
        cached = loads.kv_index.cached(tokens)
        by_id = cands.by_id
        costed = [by_id[w] for w in {**cached, **loads.inflight} if w in by_id]
        spare = self.idle(cands.items, cached)
        if spare is not None:
            costed.append(spare)
        elif len(costed) < len(cands.items):  # no idle one caching nothing: cost them all
            costed = cands.items
        w_prefill, w_load = loads.kv_weights
        n = len(tokens)
        costs = [
            w_prefill * (n - cached.get(i.id, 0)) + w_load * loads.load_tokens.get(i.id, 0)
            for i in costed
        ]
        low = min(costs)
        cheapest = [i for i, c in zip(costed, costs, strict=True) if c == low]
        return cheapest[0] if len(cheapest) == 1 else self.fewest(cheapest)


@dataclass(frozen=True)
class PolicySpec:
    make: Callable[[Loads], Chooser]
    wants_tokens: bool = False  # `choose` reads the call's context
    follows_kv: bool = False  # the router follows every worker's KV events (the KV index)


POLICIES: dict[Policy, PolicySpec] = {
    Policy.ROUND_ROBIN: PolicySpec(RoundRobin),
    Policy.RANDOM: PolicySpec(Random),
    Policy.LEAST_LOADED: PolicySpec(LeastLoaded),
    Policy.KV: PolicySpec(KvCost, wants_tokens=True, follows_kv=True),
    Policy.POWER_OF_TWO: PolicySpec(PowerOfTwo),
}
