"""What the benchmark scripts share: starting segue processes, waiting for them, reading
their CPU time, and stopping them. Standard library only (benchmarks run without the test
extras)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import IO

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log: IO[str], cwd: str | None = None) -> subprocess.Popen[bytes]:
    """`python -m segue ARGS` in its own process group (stopped as a group); from `cwd`, the
    segue package found there first (`python -m` puts the working directory first)."""
    return subprocess.Popen(
        [sys.executable, "-m", "segue", *args],
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=cwd,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return 0.0


def wait_workers(url: str, n: int, timeout: float = 60.0) -> None:
    """Until the frontend at `url` routes to `n` workers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                workers = json.loads(r.read())["workers"]
            if sum(1 for w in workers if w["routable"]) >= n:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not see {n} workers within {timeout} s")


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after `timeout`."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
