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
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from segue.discovery import Instance
from segue.router.loads import Loads
from segue.router.power_of_two import PowerOfTwo


class Chooser(Protocol):
    def choose(self, cands: list[Instance], tokens: list[int] | None) -> Instance:
        """One of `cands` (never empty); `tokens`: the call's context, when the policy
        wants it."""
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

    def choose(self, cands: list[Instance], tokens: list[int] | None) -> Instance:
        turn = self._next.setdefault(cands[0].role, itertools.count())
        return cands[next(turn) % len(cands)]


class Random:
    def __init__(self, loads: Loads) -> None:
        pass

    def choose(self, cands: list[Instance], tokens: list[int] | None) -> Instance:
        return random.choice(cands)


class LeastLoaded(RoundRobin):
    def __init__(self, loads: Loads) -> None:
        super().__init__(loads)
        self.loads = loads

    def choose(self, cands: list[Instance], tokens: list[int] | None) -> Instance:
        inflight = self.loads.inflight
        low = min(inflight.get(i.id, 0) for i in cands)
        return super().choose([i for i in cands if inflight.get(i.id, 0) == low], tokens)


class KvCost(LeastLoaded):
    def choose(self, cands: list[Instance], tokens: list[int] | None) -> Instance:
        if tokens is not None and len(cands) > 1:
            cands = self._cheapest(cands, tokens)
        return super().choose(cands, tokens)

    def _cheapest(self, cands: list[Instance], tokens: list[int]) -> list[Instance]:
        loads = self.loads
        cached = loads.kv_index.overlap(tokens, [i.id for i in cands])
        w_prefill, w_load = loads.kv_weights
        n = len(tokens)
        costs = [
            w_prefill * (n - cached[i.id]) + w_load * loads.load_tokens.get(i.id, 0) for i in cands
        ]
        low = min(costs)
        return [i for i, c in zip(cands, costs, strict=True) if c == low]


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
