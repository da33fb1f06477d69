from __future__ import annotations

import collections
import contextlib

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


def test_round_robin_takes_turns_per_role():
    """A disaggregated request picks a prefill worker, then a decode worker: each role's
    turn advances alone, so consecutive requests spread over the decode workers."""
    r = Router("round-robin")
    r.update({"p": inst("p", "prefill"), "d1": inst("d1", "decode"), "d2": inst("d2", "decode")})
    decodes = []
    for _ in range(4):
        assert r.pick(["prefill"]).id == "p"
        decodes.append(r.pick(["decode"]).id)
    assert collections.Counter(decodes) == {"d1": 2, "d2": 2}


def test_least_loaded_prefers_idle_worker():
    r = Router("least-loaded")
    r.update({i: inst(i) for i in "ab"})
    with r.track(inst("a")):
        assert all(r.pick(["aggregated"]).id == "b" for _ in range(5))
    assert "a" not in r.inflight  # only busy workers are counted


def test_least_loaded_over_a_fleet_takes_idle_workers_in_turn_then_the_fewest():
    r = Router("least-loaded")
    r.update({f"w{i}": inst(f"w{i}") for i in range(64)})
    with r.track(inst("w0")), r.track(inst("w1")), r.track(inst("w1")):
        picks = [r.pick(["aggregated"]).id for _ in range(62)]
        assert sorted(picks) == sorted(f"w{i}" for i in range(2, 64))  # each idle one once
        with contextlib.ExitStack() as busy:  # now every worker is busy but w0 (1 call)
            for i in range(2, 64):
                busy.enter_context(r.track(inst(f"w{i}")))
                busy.enter_context(r.track(inst(f"w{i}")))
            assert {r.pick(["aggregated"]).id for _ in range(5)} == {"w0"}


def test_random_policy_and_discovery_removal():
    r = Router("random")
    r.update({i: inst(i) for i in "ab"})
    assert {r.pick(["aggregated"]).id for _ in range(50)} == {"a", "b"}
    r.mark_down(inst("a"), "test")
    r.update({"b": inst("b")})
    assert "a" not in r.down  # gone from discovery: forgotten, not left "down"


def test_workers_that_left_are_forgotten():
    """Workers come and go (restarts get new ids): what the router counts per worker goes
    with them, also when a call was still in flight as it left."""
    r = Router("least-loaded")
    r.update({i: inst(i) for i in "ab"})
    with r.track(inst("a"), tokens=10), r.track(inst("b"), tokens=5):
        r.update({"b": inst("b")})  # a leaves while its call is in flight
        assert r.inflight["a"] == 1
    assert "a" not in r.inflight and "a" not in r.load_tokens
    assert r.inflight == {} and r.load_tokens == {}
    r.update({})
    assert r.inflight == {} and r.load_tokens == {}


def test_power_of_two_picks_the_less_loaded_of_two():
    r = Router("power-of-two")
    r.update({i: inst(i) for i in "abc"})
    assert not r.wants_tokens
    with r.track(inst("a")), r.track(inst("a")), r.track(inst("b")):
        picks = collections.Counter(r.pick(["aggregated"]).id for _ in range(300))
    # c (idle) wins every draw it is in (2 of 3 pairs); a (the busiest) never wins one
    assert picks["a"] == 0 and picks["c"] > picks["b"] > 0
    r.mark_down(inst("c"), "test")
    assert {r.pick(["aggregated"]).id for _ in range(20)} <= {"a", "b"}
    assert r.pick(["aggregated"], exclude={"a", "b"}) is None
    only = Router("power-of-two")
    only.update({"a": inst("a")})
    assert only.pick(["aggregated"]).id == "a"  # one candidate: no draw of two


def test_every_policy_has_a_row_and_a_cli_choice():
    from segue.frontend.config import FrontendConfig
    from segue.options import flags
    from segue.router.policies import POLICIES, Policy

    assert set(POLICIES) == set(Policy)
    (router_flag,) = [f for f in flags(FrontendConfig) if f.dest == "router"]
    assert set(router_flag.choices or ()) == {p.value for p in Policy}


def test_a_broken_connection_takes_the_workers_of_its_process_out_with_it():
    """Workers of one fleet process (`--replicas`) publish the process they share: a
    connection refused or broken by one takes its siblings out of rotation too (a killed
    host is gone at once, not one failed pick at a time); a failure that does not say the
    process is gone, or a worker of a process of its own, takes only itself."""
    r = Router("round-robin")
    fleet = {
        f"{p}{k}": Instance(
            id=f"{p}{k}", role="aggregated", url="http://x", pid=1, host="h", process=f"h:1:{p}"
        )  # fmt: skip
        for p in "ab"
        for k in range(3)
    }
    r.update({**fleet, "solo": inst("solo")})
    r.mark_down(fleet["a0"], "stall")
    assert r.down == {"a0"}
    r.mark_down(fleet["a1"], "stream_broken", process_gone=True)
    assert r.down == {"a0", "a1", "a2"}
    r.mark_down(inst("solo"), "connection_refused", process_gone=True)
    assert r.down == {"a0", "a1", "a2", "solo"}
    assert {r.pick(["aggregated"]).id for _ in range(6)} == {"b0", "b1", "b2"}
