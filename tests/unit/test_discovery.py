from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

from segue.discovery import Instance
from segue.discovery.file import FileDiscovery


def _inst(i: str, pid: int) -> Instance:
    return Instance(id=i, role="aggregated", url="http://x", pid=pid, host=socket.gethostname())


async def test_register_renew_revoke(tmp_path):
    d = FileDiscovery(str(tmp_path), "ns")
    lease = await d.register(_inst("w1", os.getpid()), ttl=1.0)
    assert set(d.snapshot()) == {"w1"}
    await asyncio.sleep(1.5)  # longer than the TTL: renewal (every ttl/3) keeps it alive
    assert set(d.snapshot()) == {"w1"}
    await lease.revoke()
    assert d.snapshot() == {}


async def test_expiry_by_ttl_without_renewal(tmp_path):
    d = FileDiscovery(str(tmp_path), "ns")
    lease = await d.register(_inst("w1", os.getpid()), ttl=0.3)
    lease._task.cancel()  # the worker hangs: no more renewals
    deadline = time.monotonic() + 3
    while d.snapshot() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert d.snapshot() == {}


async def test_dead_local_pid_is_dropped_at_once(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    d = FileDiscovery(str(tmp_path), "ns")
    await d.register(_inst("gone", p.pid), ttl=60)
    assert d.snapshot() == {}


async def test_watch_yields_changes(tmp_path):
    d = FileDiscovery(str(tmp_path), "ns")
    seen = []

    async def watcher():
        async for s in d.watch():
            seen.append(set(s))
            if len(seen) == 3:
                return

    t = asyncio.create_task(watcher())
    await asyncio.sleep(0.1)
    lease = await d.register(_inst("w1", os.getpid()), ttl=5)
    await asyncio.sleep(0.2)
    await lease.revoke()
    await asyncio.wait_for(t, 5)
    assert seen == [set(), {"w1"}, set()]
