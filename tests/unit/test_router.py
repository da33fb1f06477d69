from __future__ import annotations

import collections

from segue.discovery import Instance
from segue.router import Router


def inst(i: str, role: str = "aggregated") -> Instance:
    return Instance(id=i, role=role, url=f"http://{i}", pid=1, host="h")


def test_round_robin_skips_down_and_excluded():
    r = Router("round-robin")
    r.update({i: inst(i) for i in "abc"})
    picks = [r.pick(["aggregated"]).id for _ in range(6)]
    assert collections.Counter(picks) == {"a": 2, "b": 2, "c": 2}
    r.mark_down(inst("b"), "test")
    assert {r.pick(["aggregated"]).id for _ in range(4)} == {"a", "c"}
    assert r.pick(["aggregated"], exclude={"a", "c"}) is None
    assert r.pick(["prefill"]) is None


def test_least_loaded_prefers_idle_worker():
    r = Router("least-loaded")
    r.update({i: inst(i) for i in "ab"})
    with r.track(inst("a")):
        assert all(r.pick(["aggregated"]).id == "b" for _ in range(5))
    assert r.inflight["a"] == 0


def test_random_policy_and_discovery_removal():
    r = Router("random")
    r.update({i: inst(i) for i in "ab"})
    assert {r.pick(["aggregated"]).id for _ in range(50)} == {"a", "b"}
    r.mark_down(inst("a"), "test")
    r.update({"b": inst("b")})
    assert "a" not in r.down  # gone from discovery: forgotten, not left "down"
