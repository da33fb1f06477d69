"""KV-aware routing with real processes: prefix caches in the mocker workers, their KV
events followed by every frontend, cached tokens reported, a dead worker's blocks gone
from every index, and a migration sent to the worker that caches the prefix."""

from __future__ import annotations

import signal

import httpx
from client import body, complete
from faults import metric, worker_of
from harness import Proc, wait_until

DOC = " ".join(f"section {i} of the long shared document" for i in range(40))
HIT = 'segue_engine_prompt_tokens_total{source="local_cache_hit"}'


def indexed(frontend: Proc, worker: Proc) -> int | None:
    """Blocks of `worker` in `frontend`'s KV index (None: not indexed)."""
    for w in httpx.get(frontend.url + "/health").json()["workers"]:
        if w["url"] == worker.url:
            return w["kv_blocks"]
    return None


def cached(r) -> int:
    assert r.status == 200, r.error
    return r.usage["prompt_tokens_details"]["cached_tokens"]


def test_kv_router_sends_a_shared_prefix_where_it_is_cached(deploy):
    deploy.start_frontend("--router", "kv")
    deploy.start_worker()
    deploy.start_worker()
    first = complete(deploy.url, "completions", body("completions", DOC, 4, False), "kv-0")
    assert cached(first) == 0
    holder = worker_of(deploy, "kv-0")
    wait_until(lambda: (indexed(deploy.frontend, holder) or 0) > 0, what="blocks indexed")
    hits = 0
    for i in range(4):
        prompt = f"{DOC} and question {i}"
        r = complete(
            deploy.url, "completions", body("completions", prompt, 4, False), f"kv-{i + 1}"
        )
        assert worker_of(deploy, f"kv-{i + 1}") is holder
        assert cached(r) >= first.usage["prompt_tokens"] - 16  # all but a partial block
        hits += cached(r)
    assert metric(holder, HIT) == hits  # the engine counts what the responses report


def test_every_frontend_indexes_the_blocks_and_drops_a_dead_workers(deploy):
    fe1 = deploy.start_frontend("--router", "kv")
    fe2 = deploy.start_frontend("--router", "kv")
    w = deploy.start_worker()
    assert complete(fe1.url, "completions", body("completions", DOC, 4, False)).status == 200
    wait_until(
        lambda: (indexed(fe1, w) or 0) > 0 and indexed(fe1, w) == indexed(fe2, w),
        what="both frontends index the worker's blocks",
    )
    w.signal(signal.SIGKILL)
    for fe in (fe1, fe2):
        wait_until(lambda fe=fe: indexed(fe, w) is None, what="the dead worker's blocks gone")


def test_a_migration_goes_to_the_worker_caching_the_prefix(deploy):
    """Workers a (dies after its 8th token) and b cache the document; c does not. A request
    that starts on a continues on b, which finds the document in its cache."""
    warm = deploy.start_frontend()  # round-robin: one warm-up request to each of a and b
    a = deploy.start_worker("--fault-exit-after-tokens", "8")
    b = deploy.start_worker()
    for i in range(2):
        r = complete(warm.url, "completions", body("completions", DOC, 2, False), f"warm-{i}")
        assert r.status == 200
    kv = deploy.start_frontend("--router", "kv")
    wait_until(lambda: indexed(kv, a) and indexed(kv, a) == indexed(kv, b), what="indexed")
    c = deploy.start_worker()
    for i in range(2):  # a and b tie on cost: one of two requests starts on a
        rid = f"kv-mig-{i}"
        r = complete(kv.url, "completions", body("completions", DOC, 12, False), rid)
        if f"New Request ID: {rid}" in a.log():
            break
    else:
        raise AssertionError("no request started on the worker that dies")
    assert len(r.token_ids) == 12
    assert f"New Request ID: {rid}" in b.log() and f"New Request ID: {rid}" not in c.log()
    assert cached(r) > 0  # b had the document cached
