"""The frontend's KV index and the kv routing policy, on constructed cases."""

from __future__ import annotations

from segue.blocks import block_hashes
from segue.discovery import Instance
from segue.protocol import KvEvents, KvSnapshot, Role
from segue.router import Policy, Router
from segue.router.kv_index import KvIndex

BS = 4
DOC = list(range(100, 124))  # 6 full blocks


def snap(blocks: list[int], seq: int = 0, capacity: int = 100) -> KvSnapshot:
    return KvSnapshot(seq=seq, block_size=BS, capacity=capacity, blocks=blocks)


def test_overlap_is_the_run_of_leading_blocks_each_worker_holds():
    idx = KvIndex()
    h = block_hashes(DOC, BS)
    idx.snapshot("a", snap(h[:4]))
    idx.snapshot("b", snap(h[:2] + h[3:]))  # lost block 2: only 2 leading blocks count
    idx.snapshot("c", snap([]))
    assert idx.overlap(DOC + [7], ["a", "b", "c", "d"]) == {"a": 16, "b": 8, "c": 0, "d": 0}


def test_events_in_order_apply_and_a_gap_asks_for_a_resync():
    idx = KvIndex()
    h = block_hashes(DOC, BS)
    idx.snapshot("a", snap(h[:1], seq=5))
    assert idx.apply("a", KvEvents(seq=5, stored=[h[5]]))  # covered by the snapshot: skipped
    assert idx.apply("a", KvEvents(seq=6, stored=h[1:3]))
    assert idx.overlap(DOC, ["a"]) == {"a": 12}
    assert idx.apply("a", KvEvents(seq=7, removed=[h[1]]))
    assert idx.overlap(DOC, ["a"]) == {"a": 4}
    assert not idx.apply("a", KvEvents(seq=9, stored=[h[1]]))  # 8 is missing
    idx.snapshot("a", snap(h[:3], seq=9))  # the resync
    assert idx.overlap(DOC, ["a"]) == {"a": 12}


def test_a_worker_that_leaves_takes_its_blocks_and_the_index_empties():
    idx = KvIndex()
    h = block_hashes(DOC, BS)
    idx.snapshot("a", snap(h))
    idx.snapshot("b", snap(h[:3]))
    idx.remove("a")
    assert idx.overlap(DOC, ["a", "b"]) == {"a": 0, "b": 12}
    idx.remove("b")
    assert idx.holders == {} and idx.size == 0
    idx.snapshot("c", snap(h[:1]))  # a freed bit is reused cleanly
    assert idx.overlap(DOC, ["c"]) == {"c": 4}


def test_more_blocks_than_the_cache_holds_means_missed_removals():
    idx = KvIndex()
    h = block_hashes(DOC, BS)
    idx.snapshot("a", snap(h[:2], capacity=3))
    assert not idx.apply("a", KvEvents(seq=1, stored=h[2:4]))


def _router(*wids: str, overlap_weight: float = 1.0, load_weight: float = 1.0) -> Router:
    r = Router(Policy.KV, None, overlap_weight, load_weight)
    r.update(
        {w: Instance(id=w, role=Role.AGGREGATED, url=f"http://{w}", pid=0, host="h") for w in wids}
    )
    return r


def test_kv_policy_picks_the_prefix_holder_weighed_against_load():
    r = _router("a", "b", load_weight=1.0)
    h = block_hashes(DOC, BS)
    r.kv_index.snapshot("b", snap(h))
    prompt = DOC + [1, 2]
    assert r.pick([Role.AGGREGATED], tokens=prompt).id == "b"  # type: ignore[union-attr]
    with r.track(r.instances["b"], tokens=30):  # b busy with 30 tokens > 24 it saves
        assert r.pick([Role.AGGREGATED], tokens=prompt).id == "a"  # type: ignore[union-attr]
    assert r.pick([Role.AGGREGATED], exclude={"b"}, tokens=prompt).id == "a"  # type: ignore[union-attr]


def test_kv_policy_ties_go_to_fewer_calls_in_flight():
    r = _router("a", "b", load_weight=0.0)
    with r.track(r.instances["a"]):
        for _ in range(3):
            assert r.pick([Role.AGGREGATED], tokens=[1, 2, 3]).id == "b"  # type: ignore[union-attr]


def test_kv_policy_over_a_fleet_costs_holders_busy_workers_and_one_idle_one():
    """Among 64 workers: the prefix holder wins; a prompt nobody caches goes to the idle
    workers in turn; when the holder is busier than its cache saves, an idle one wins."""
    r = _router(*(f"w{i}" for i in range(64)), load_weight=1.0)
    h = block_hashes(DOC, BS)
    r.kv_index.snapshot("w40", snap(h))
    prompt = DOC + [1, 2]
    assert r.kv_index.cached(prompt) == {"w40": len(h) * BS}
    assert all(r.pick([Role.AGGREGATED], tokens=prompt).id == "w40" for _ in range(3))  # type: ignore[union-attr]
    other = [9999] * len(DOC)
    picks = {r.pick([Role.AGGREGATED], tokens=other).id for _ in range(64)}  # type: ignore[union-attr]
    assert len(picks) == 64
    with r.track(r.instances["w40"], tokens=30):
        got = r.pick([Role.AGGREGATED], tokens=prompt)
        assert got is not None and got.id != "w40"
