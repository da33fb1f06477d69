"""`segue frontend --processes N`: N processes on one port, one /metrics view, one stop."""

from __future__ import annotations

import concurrent.futures as cf
import signal

from client import body, complete
from faults import metric
from harness import children, wait_until


def test_frontend_processes_share_a_port_and_sum_their_metrics(deploy):
    fe = deploy.start_frontend("--processes", "3")
    deploy.start_worker()
    kids = wait_until(
        lambda: len(children(fe.pid)) == 3 and children(fe.pid), 30, what="three frontend processes"
    )
    # each process discovers the worker on its own: on a loaded machine one may not have
    # yet, and would answer 503 (no worker) to its share of the requests below
    wait_until(lambda: fe.log().count(" joined (") >= 3, 30, what="every process sees it")
    want = complete(deploy.url, "completions", body("completions", "the sea", 8, False))
    with cf.ThreadPoolExecutor(8) as ex:
        got = list(
            ex.map(
                lambda _: complete(
                    deploy.url, "completions", body("completions", "the sea", 8, False)
                ),
                range(40),
            )
        )
    assert [(r.status, r.error) for r in got if r.status != 200] == []
    assert [r.token_ids for r in got if r.token_ids != want.token_ids] == [], want.token_ids
    name = 'segue_frontend_requests_total{endpoint="completions",status="200"}'
    for _ in range(6):  # whichever process answers the scrape, it counts all of them
        assert metric(deploy, name) == 41
    fe.signal(signal.SIGTERM)
    assert fe.popen.wait(30) == 0
    wait_until(
        lambda: not (children(fe.pid) & kids) and not any(_alive(k) for k in kids),
        10,
        what="the processes gone",
    )


def _alive(pid: int) -> bool:
    from harness import proc_stat

    st = proc_stat(pid)
    return st is not None and st[0] != "Z"
