"""Shared pieces of the fault tests."""

from __future__ import annotations

import http.client
import json
import signal
import time

from harness import Deployment, Proc


def worker_of(d: Deployment, rid: str, timeout: float = 10.0) -> Proc:
    """The worker whose log shows `New Request ID: rid` (all logs polled each round)."""
    needle = f"New Request ID: {rid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [w for w in d.workers if needle in w.log()]
        if hits:
            return hits[-1]
        time.sleep(0.005)
    raise AssertionError(f"no worker logged {needle!r}")


def metric(d_or_proc, name: str, default: float = 0.0) -> float:
    proc = d_or_proc.frontend if isinstance(d_or_proc, Deployment) else d_or_proc
    return proc.metrics().get(name, default)


def migrations(d: Deployment, reason: str) -> float:
    return metric(d, f'segue_frontend_migrations_total{{reason="{reason}"}}')


def migration_counts(d: Deployment) -> dict[str, float]:
    """The frontend's migration counters by label (for assertion messages)."""
    return {
        k: v
        for k, v in d.frontend.metrics().items()
        if k.startswith("segue_frontend_migrations_total")
    }


def total_migrations(d: Deployment) -> float:
    return sum(migration_counts(d).values())


def move_while_stopped(worker: Proc, rid: str) -> list[str]:
    """Stop the worker, send the move (it waits in the worker's socket buffer), let it go:
    the move is read before the request can finish, however slowly this process runs."""
    host, port = worker.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    worker.signal(signal.SIGSTOP)
    try:
        conn.request(
            "POST",
            "/admin/move",
            json.dumps({"request_id": rid}),
            {"Content-Type": "application/json"},
        )
    finally:
        worker.signal(signal.SIGCONT)
    r = conn.getresponse()
    assert r.status == 200
    moved: list[str] = json.loads(r.read())["moved"]
    conn.close()
    return moved
