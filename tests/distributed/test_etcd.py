"""Discovery through a real etcd (single node and a 3-node cluster): workers hold leases,
frontends watch with revision resume, and an etcd outage under load fails nothing."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import shutil
import signal
import threading

import httpx
import pytest
from client import body, complete
from etcd import Etcd
from faults import total_migrations
from harness import Deployment, wait_until

PROMPT = "the river and the sea"


@pytest.fixture
def etcd(tmp_path):
    e = Etcd(tmp_path)
    yield e
    e.stop()


@pytest.fixture
def edeploy(tmp_path, etcd):
    d = Deployment(tmp_path, discovery=etcd.spec)
    yield d
    d.stop()


def worker_ids(d: Deployment, fe=None) -> set[str]:
    fe = fe or d.frontend
    return {w["url"] for w in httpx.get(fe.url + "/health", timeout=5).json()["workers"]}


def test_etcd_discovery_serves_and_forgets_a_dead_worker(edeploy):
    edeploy.start_frontend()
    a = edeploy.start_worker("--lease-ttl", "2")
    b = edeploy.start_worker("--lease-ttl", "2")
    want = complete(edeploy.url, "completions", body("completions", PROMPT, 16, False))
    assert want.status == 200 and len(want.token_ids) == 16
    a.signal(signal.SIGKILL)
    wait_until(lambda: worker_ids(edeploy) == {b.url}, 15, what="the dead worker's lease gone")
    got = complete(edeploy.url, "completions", body("completions", PROMPT, 16, False))
    assert got.token_ids == want.token_ids


def test_etcd_outage_under_load_fails_nothing(edeploy, etcd):
    """etcd down for 30 s while requests flow: zero failures; the workers re-register when
    it is back, and a worker started meanwhile is seen then."""
    edeploy.start_frontend()
    edeploy.start_worker("--lease-ttl", "2")
    edeploy.start_worker("--lease-ttl", "2")
    want = complete(edeploy.url, "completions", body("completions", PROMPT, 8, False))
    stop = threading.Event()
    results: list = []

    def load() -> None:
        while not stop.is_set():
            results.append(
                complete(
                    edeploy.url, "completions", body("completions", PROMPT, 8, False), timeout=30
                )
            )

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(load) for _ in range(4)]
        wait_until(lambda: len(results) >= 20, what="load running")
        etcd.members[0].kill()
        down_from = len(results)
        late = edeploy.start_worker("--lease-ttl", "2", wait=False)  # registers once etcd is back
        wait_until(lambda: len(results) >= down_from + 50, 60, what="requests while etcd down")
        # hold the outage for 30 s of wall time while the load goes on
        deadline = threading.Event()
        threading.Timer(30.0, deadline.set).start()
        wait_until(deadline.is_set, 40, what="30 s of etcd outage")
        during = len(results) - down_from
        etcd.restart()
        wait_until(lambda: late.url in worker_ids(edeploy), 30, what="the late worker seen")
        stop.set()
        for f in futs:
            f.result(timeout=60)
    assert during > 0
    bad = [r for r in results if r.status != 200 or r.token_ids != want.token_ids]
    assert not bad, bad[:3]
    assert len(worker_ids(edeploy)) == 3
    assert total_migrations(edeploy) == 0


def test_frontend_started_while_etcd_is_down_serves_once_it_is_back(tmp_path, etcd):
    d = Deployment(tmp_path, discovery=etcd.spec)
    try:
        etcd.members[0].kill()
        d.start_frontend()
        wait_until(lambda: "etcd unreachable" in d.frontend.log(), 10, what="it says so")
        r = httpx.post(d.url + "/v1/completions", json=body("completions", PROMPT, 4, False))
        assert r.status_code == 503
        etcd.restart()
        d.start_worker()
        assert complete(d.url, "completions", body("completions", PROMPT, 4, False)).status == 200
    finally:
        d.stop()


def test_one_member_of_three_killed_has_no_effect(tmp_path):
    cluster = Etcd(tmp_path, nodes=3)
    d = Deployment(tmp_path, discovery=cluster.spec)
    try:
        d.start_frontend()
        a = d.start_worker("--lease-ttl", "2")
        want = complete(d.url, "completions", body("completions", PROMPT, 8, False))
        cluster.members[0].kill()  # the first endpoint every client tries
        b = d.start_worker("--lease-ttl", "2")
        for _ in range(10):
            got = complete(d.url, "completions", body("completions", PROMPT, 8, False))
            assert got.status == 200 and got.token_ids == want.token_ids
        assert worker_ids(d) == {a.url, b.url}
        a.signal(signal.SIGKILL)
        wait_until(lambda: worker_ids(d) == {b.url}, 15, what="a dead worker still dropped")
    finally:
        d.stop()
        cluster.stop()


def test_etcd_back_without_its_data_fails_nothing(edeploy, etcd):
    """etcd restarted empty (its data lost): the frontend keeps the workers it knew until
    they register again (each at its next renewal), so requests sent meanwhile all succeed,
    and etcd ends up holding both workers again."""
    edeploy.start_frontend()
    # renewals every 2 s: the workers are back in etcd up to 2 s after it is
    a = edeploy.start_worker("--lease-ttl", "6")
    b = edeploy.start_worker("--lease-ttl", "6")
    want = complete(edeploy.url, "completions", body("completions", PROMPT, 8, False))
    member = etcd.members[0]
    # etcd's revision well past what the new one reaches meanwhile, as a fleet's history
    # of comings and goings makes it (not workers' records: the frontend ignores them)
    for i in range(50):
        key = base64.b64encode(f"segue/default/instances/junk{i}".encode()).decode()
        httpx.post(member.client_url + "/v3/kv/put", json={"key": key, "value": key})
    # then a record the frontend shows, and its removal: once it is gone from the
    # frontend's view, every put before it has reached the frontend
    key = base64.b64encode(b"segue/default/instances/sentinel").decode()
    rec = {"id": "sentinel", "role": "aggregated", "url": "http://127.0.0.1:9", "pid": 0,
           "host": "h"}  # fmt: skip
    value = base64.b64encode(json.dumps(rec).encode()).decode()
    httpx.post(member.client_url + "/v3/kv/put", json={"key": key, "value": value})
    wait_until(lambda: rec["url"] in worker_ids(edeploy), 10, what="the sentinel seen")
    httpx.post(member.client_url + "/v3/kv/deleterange", json={"key": key})
    wait_until(lambda: rec["url"] not in worker_ids(edeploy), 10, what="the sentinel gone")
    member.kill()
    shutil.rmtree(member.tmp / f"{member.name}.data")
    member.start(etcd.cluster)  # a new cluster: nothing registered, revision 1
    etcd.wait_healthy()
    wait_until(lambda: "came back without its data" in edeploy.frontend.log(), 10, what="log")
    prefix = "segue/default/instances/"
    seen, views = [], []
    while etcd.count_keys(prefix) < 2:  # until both registered again
        views.append(worker_ids(edeploy))
        seen.append(complete(edeploy.url, "completions", body("completions", PROMPT, 8, False)))
        assert len(seen) < 500, "the workers did not register again"
    assert all(v == {a.url, b.url} for v in views), views
    assert all(r.status == 200 and r.token_ids == want.token_ids for r in seen)
    assert worker_ids(edeploy) == {a.url, b.url}
