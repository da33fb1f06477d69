"""Power of two choices: two workers drawn at random, the one with fewer calls in flight
from this process wins (the first drawn on a tie). Nearly as even as least-loaded, without
every frontend process herding onto the same idlest worker (Ray Serve's and the SGLang
gateway's default)."""

from __future__ import annotations

import random

from segue.discovery import Instance
from segue.router.candidates import Candidates
from segue.router.loads import Loads


class PowerOfTwo:
    def __init__(self, loads: Loads, rng: random.Random | None = None) -> None:
        self.loads = loads
        self.rng = rng or random.Random()

    def choose(self, cands: Candidates, tokens: list[int] | None) -> Instance:
        items = cands.items
        if len(items) == 1:
            return items[0]
        a, b = self.rng.sample(items, 2)
        inflight = self.loads.inflight
        return b if inflight.get(b.id, 0) < inflight.get(a.id, 0) else a
