"""A burst of many times a frontend's capacity (closed-loop clients): its RSS, how fast
/health and /metrics still answer (on the serving port and on --system-port, whose thread
answers them), and how the requests were answered (200; 503 past
--max-inflight, or 429 when every worker is at its admission limit: both at once, instead
of queueing).

    python bench/burst.py --max-inflight 64 --burst 640
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

import aiohttp
from _common import free_port, spawn, stop, wait_workers


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def probe(url: str, sys_url: str, fe_pid: int, stop, results) -> None:
    """/health and /metrics on both ports in turn, 20 times a second, and the frontend's
    peak RSS, until `stop`."""
    probes: dict[str, list[float]] = {"serving": [], "system": []}
    peak = rss_mib(fe_pid)
    while not stop.is_set():
        for port, base in (("serving", url), ("system", sys_url)):
            for path in ("/health", "/metrics"):
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(base + path, timeout=30) as r:
                        r.read()
                except urllib.error.HTTPError as e:  # 503 is an answer too
                    e.read()
                probes[port].append(time.perf_counter() - t0)
        peak = max(peak, rss_mib(fe_pid))
        stop.wait(0.05)
    results.put((probes, peak))


async def run(url: str, sys_url: str, fe_pid: int, a: argparse.Namespace) -> dict:
    statuses: collections.Counter[int] = collections.Counter()
    # The prober is a process of its own: in this one its requests would wait behind the
    # burst's 640 clients on this event loop, and measure that.
    stop_probing = multiprocessing.Event()
    results: multiprocessing.Queue = multiprocessing.Queue()
    prober = multiprocessing.Process(
        target=probe, args=(url, sys_url, fe_pid, stop_probing, results), daemon=True
    )
    body = {"model": "segue-mocker", "prompt": "the river runs to the sea", "max_tokens": 32}

    async def one(s: aiohttp.ClientSession, until: float) -> None:
        while time.perf_counter() < until:  # closed loop: at once again, whatever the answer
            try:
                async with s.post(url + "/v1/completions", json=body) as r:
                    await r.read()
                    statuses[r.status] += 1
            except aiohttp.ClientError:
                statuses[0] += 1

    before = rss_mib(fe_pid)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(300)) as s:
        prober.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s, t0 + a.duration) for _ in range(a.burst)))
        wall = time.perf_counter() - t0
        stop_probing.set()
        probes, peak = results.get(timeout=30)
        prober.join(10)
    out = {
        "burst": a.burst,
        "max_inflight": a.max_inflight,
        "statuses": dict(statuses),
        "wall_s": round(wall, 2),
        "rss_mib_before": round(before, 1),
        "rss_mib_peak": round(peak, 1),
    }
    for port, times in probes.items():
        times.sort()
        out[f"{port}_port_probes"] = len(times)
        out[f"{port}_probe_ms_p50"] = round(times[len(times) // 2] * 1000, 1)
        out[f"{port}_probe_ms_p99"] = round(times[int(len(times) * 0.99)] * 1000, 1)
        out[f"{port}_probe_ms_max"] = round(times[-1] * 1000, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-inflight", type=int, default=64)
    ap.add_argument("--burst", type=int, default=640)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of closed-loop burst")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="segue-burst-")
    port, sys_port = free_port(), free_port()
    with open(os.path.join(tmp, "procs.log"), "w") as log:
        disc = ["--discovery", f"file:{tmp}"]
        procs = [
            spawn(["--log-level", "WARNING", "worker", *disc, "--mocker-step-ms", "5"], log)
            for _ in range(a.workers)
        ]
        fe_args = ["frontend", *disc, "--port", str(port), "--max-inflight", str(a.max_inflight)]
        fe_args += ["--system-port", str(sys_port)]
        fe = spawn(["--log-level", "WARNING", *fe_args], log)
        procs.append(fe)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_workers(url, a.workers)
            sys_url = f"http://127.0.0.1:{sys_port}"
            print(json.dumps(asyncio.run(run(url, sys_url, fe.pid, a))), flush=True)
        finally:
            stop(procs)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
