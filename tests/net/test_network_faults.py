"""The faults of a network, with every process on a host of its own (a network namespace):
a partition mid-stream, a worker cut off from etcd only, a slow lossy link, a worker host
that vanishes, a frontend host that vanishes. Each checks the tokens against an
uninterrupted run and the engine gauges of the surviving workers."""

from __future__ import annotations

import signal

import httpx
import pytest
from client import StreamReader, body, complete, uid
from etcd import Etcd
from faults import metric, total_migrations
from harness import Deployment, wait_until

PROMPT = "the river and the sea"
SLOW = ("--mocker-step-ms", "5")  # the worker a request starts on: slow enough to strike
FAST = ("--mocker-speedup", "50")  # where it continues


@pytest.fixture
def ndeploy(tmp_path, net):
    d = Deployment(tmp_path)
    yield d
    d.stop()


def routable(d: Deployment, w, fe=None) -> bool | None:
    fe = fe or d.frontend
    for x in httpx.get(fe.url + "/health", timeout=5).json()["workers"]:
        if x["url"] == w.url:
            return bool(x["routable"])
    return None  # not listed


def assert_idle(*workers) -> None:
    for w in workers:
        wait_until(
            lambda w=w: metric(w, "segue_engine_running_requests") == 0,
            what=f"{w.name} running back to 0",
        )
        assert metric(w, "segue_engine_kv_blocks_used") == 0


def test_partitioned_worker_mid_stream(ndeploy, net):
    """The request migrates after the stall timeout, token-exact; the cut-off worker (no
    FIN will ever come) aborts it within --caller-timeout; it is routed to again only once a
    health probe answers after the partition heals."""
    d = ndeploy
    fe_h, w1_h, w2_h = net.host("fe"), net.host("w1"), net.host("w2")
    d.start_frontend("--host", fe_h.addr, "--stall-timeout", "2", netns=fe_h.name)
    w1 = d.start_worker("--host", w1_h.addr, "--caller-timeout", "4", *SLOW, netns=w1_h.name)
    rid = uid("part")
    s = StreamReader(d.url, "completions", body("completions", PROMPT, 3000, True), rid)
    s.read_tokens(10)
    w2 = d.start_worker("--host", w2_h.addr, *FAST, netns=w2_h.name)
    w1.signal(signal.SIGSTOP)  # it cannot finish the request while we strike
    w1_h.partition()
    w1.signal(signal.SIGCONT)
    got = s.finish()
    assert routable(d, w1) is False
    want = complete(d.url, "completions", body("completions", PROMPT, 3000, False))
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert metric(d, 'segue_frontend_migrations_total{reason="stall"}') == 1
    w1.wait_log(f"Aborted Request ID: {rid}")  # found by TCP_USER_TIMEOUT, link still down
    for _ in range(5):  # nothing more is sent its way
        assert complete(d.url, "completions", body("completions", PROMPT, 8, False)).status == 200
    assert total_migrations(d) == 1
    w1_h.heal()
    wait_until(lambda: routable(d, w1) is True, 30, what="w1 back after a health probe")
    assert_idle(w1, w2)


def test_worker_cut_off_from_etcd_only(ndeploy, net, tmp_path):
    """Its lease expires, it leaves discovery and gets no new request; a request it is
    running goes on to the end there (the frontend still reaches it); it registers again
    when the link returns."""
    e_h, fe_h, w1_h, w2_h = (net.host(n) for n in ("etcd", "fe", "w1", "w2"))
    etcd = Etcd(tmp_path, host=e_h.addr, prefix=["ip", "netns", "exec", e_h.name])
    d = Deployment(tmp_path / "d", discovery=etcd.spec)
    (tmp_path / "d").mkdir()
    try:
        d.start_frontend("--host", fe_h.addr, netns=fe_h.name)
        ttl = ("--lease-ttl", "2")
        w1 = d.start_worker("--host", w1_h.addr, *ttl, "--mocker-step-ms", "10", netns=w1_h.name)
        rid = uid("etcdcut")
        s = StreamReader(d.url, "completions", body("completions", PROMPT, 1500, True), rid)
        s.read_tokens(5)
        w2 = d.start_worker("--host", w2_h.addr, *ttl, *FAST, netns=w2_h.name)
        w1_h.block(e_h)
        wait_until(lambda: routable(d, w1) is None, 30, what="w1's lease expired")
        ids = [uid("after") for _ in range(5)]
        for i in ids:
            assert (
                complete(d.url, "completions", body("completions", PROMPT, 8, False), rid=i).status
                == 200
            )
        assert not any(f"New Request ID: {i}" in w1.log() for i in ids)
        got = s.finish()
        want = complete(d.url, "completions", body("completions", PROMPT, 1500, False))
        assert got.token_ids == want.token_ids and total_migrations(d) == 0
        w1_h.unblock(e_h)
        wait_until(lambda: routable(d, w1) is True, 30, what="w1 registered again")
        assert_idle(w1, w2)
    finally:
        d.stop()
        etcd.stop()


def test_slow_lossy_link_causes_no_false_migration(ndeploy, net):
    d = ndeploy
    fe_h, w1_h, w2_h = net.host("fe"), net.host("w1"), net.host("w2")
    d.start_frontend("--host", fe_h.addr, netns=fe_h.name)
    w1 = d.start_worker("--host", w1_h.addr, netns=w1_h.name)
    w2 = d.start_worker("--host", w2_h.addr, netns=w2_h.name)
    want = complete(d.url, "completions", body("completions", PROMPT, 64, False))
    for h in (w1_h, w2_h):
        h.slow_link(100, 2)
    readers = [
        StreamReader(d.url, "completions", body("completions", PROMPT, 64, True), uid("slow"))
        for _ in range(8)
    ]
    for r in readers:
        got = r.finish()
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    assert total_migrations(d) == 0
    assert_idle(w1, w2)


def test_worker_host_vanishes(ndeploy, net):
    """Every process of the host killed behind a dead link: like a SIGKILL without the
    FIN. The request migrates token-exact; nothing is routed there afterwards."""
    d = ndeploy
    fe_h, w1_h, w2_h = net.host("fe"), net.host("w1"), net.host("w2")
    d.start_frontend("--host", fe_h.addr, "--stall-timeout", "2", netns=fe_h.name)
    w1 = d.start_worker("--host", w1_h.addr, *SLOW, netns=w1_h.name)
    rid = uid("gone")
    s = StreamReader(d.url, "completions", body("completions", PROMPT, 3000, True), rid)
    s.read_tokens(10)
    w2 = d.start_worker("--host", w2_h.addr, *FAST, netns=w2_h.name)
    w1_h.vanish()
    got = s.finish()
    want = complete(d.url, "completions", body("completions", PROMPT, 3000, False))
    assert got.token_ids == want.token_ids
    for _ in range(10):
        assert complete(d.url, "completions", body("completions", PROMPT, 8, False)).status == 200
    assert total_migrations(d) == 1
    assert not w1.alive()
    assert_idle(w2)


def test_frontend_host_vanishes_with_a_second_frontend_serving(ndeploy, net):
    """The workers notice the vanished frontend's request (no FIN) and abort it; the other
    frontend's request is untouched."""
    d = ndeploy
    f1_h, f2_h, w1_h = net.host("f1"), net.host("f2"), net.host("w1")
    fe1 = d.start_frontend("--host", f1_h.addr, netns=f1_h.name)
    fe2 = d.start_frontend("--host", f2_h.addr, netns=f2_h.name)
    w1 = d.start_worker("--host", w1_h.addr, "--caller-timeout", "4", *SLOW, netns=w1_h.name)
    want = complete(fe2.url, "completions", body("completions", PROMPT, 600, False))
    rid1, rid2 = uid("f1"), uid("f2")
    s1 = StreamReader(fe1.url, "completions", body("completions", PROMPT, 3000, True), rid1)
    s2 = StreamReader(fe2.url, "completions", body("completions", PROMPT, 600, True), rid2)
    s1.read_tokens(3)
    s2.read_tokens(3)
    f1_h.vanish()
    w1.wait_log(f"Aborted Request ID: {rid1}")
    got = s2.finish()
    assert got.token_ids == want.token_ids
    # every reason is exported from the start, at 0: none may have counted
    assert not any(
        v for k, v in fe2.metrics().items() if k.startswith("segue_frontend_migrations_total")
    )
    s1.close()  # its frontend is gone: reading on would wait for a host that is not there
    assert_idle(w1)
