"""A burst of many times a frontend's capacity (closed-loop clients): its RSS, how fast
/health and /metrics still answer, and how the requests were answered (200; 503 past
--max-inflight, or 429 when every worker is at its admission limit: both at once, instead
of queueing).

    python bench/burst.py --max-inflight 64 --burst 640
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import tempfile
import time

import aiohttp
from _common import free_port, spawn, stop, wait_workers


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run(url: str, fe_pid: int, a: argparse.Namespace) -> dict:
    statuses: collections.Counter[int] = collections.Counter()
    probes: list[float] = []
    peak = rss_mib(fe_pid)
    done = asyncio.Event()
    body = {"model": "segue-mocker", "prompt": "the river runs to the sea", "max_tokens": 32}

    async def one(s: aiohttp.ClientSession, until: float) -> None:
        while time.perf_counter() < until:  # closed loop: at once again, whatever the answer
            try:
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    statuses[r.status] += 1
            except aiohttp.ClientError:
                statuses[0] += 1

    async def probe(s: aiohttp.ClientSession) -> None:
        nonlocal peak
        while not done.is_set():
            for path in ("/health", "/metrics"):
                t0 = time.perf_counter()
                async with s.get(url + path) as r:
                    await r.read()
                probes.append(time.perf_counter() - t0)
            peak = max(peak, rss_mib(fe_pid))
            await asyncio.sleep(0.05)

    before = rss_mib(fe_pid)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(300)) as s:
        async with aiohttp.ClientSession() as ps:
            prober = asyncio.create_task(probe(ps))
            t0 = time.perf_counter()
            await asyncio.gather(*(one(s, t0 + a.duration) for _ in range(a.burst)))
            wall = time.perf_counter() - t0
            done.set()
            await prober
    probes.sort()
    return {
        "burst": a.burst,
        "max_inflight": a.max_inflight,
        "statuses": dict(statuses),
        "wall_s": round(wall, 2),
        "rss_mib_before": round(before, 1),
        "rss_mib_peak": round(peak, 1),
        "probe_ms_p50": round(probes[len(probes) // 2] * 1000, 1),
        "probe_ms_p99": round(probes[int(len(probes) * 0.99)] * 1000, 1),
        "probe_ms_max": round(probes[-1] * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-inflight", type=int, default=64)
    ap.add_argument("--burst", type=int, default=640)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of closed-loop burst")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="segue-burst-")
    port = free_port()
    with open(os.path.join(tmp, "procs.log"), "w") as log:
        disc = ["--discovery", f"file:{tmp}"]
        procs = [
            spawn(["--log-level", "WARNING", "worker", *disc, "--mocker-step-ms", "5"], log)
            for _ in range(a.workers)
        ]
        fe_args = ["frontend", *disc, "--port", str(port), "--max-inflight", str(a.max_inflight)]
        fe = spawn(["--log-level", "WARNING", *fe_args], log)
        procs.append(fe)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_workers(url, a.workers)
            print(json.dumps(asyncio.run(run(url, fe.pid, a))), flush=True)
        finally:
            stop(procs)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
