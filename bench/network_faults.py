"""Network faults, measured: partition -> next token at the client, partition -> orphaned
request freed on the cut-off worker, and worker killed -> gone from the frontend's view with
file vs etcd discovery. Every process on a host of its own (network namespaces: run as root;
etcd from Debian's etcd-server).

    python bench/network_faults.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from segue.netsim import Net  # noqa: E402

READY = re.compile(r"segue (?:worker|frontend) ready .*?url=(\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    def __init__(self, args: list[str], log: str, netns: str | None = None) -> None:
        self.log = log
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.p = subprocess.Popen(
            [*prefix, sys.executable, "-m", "segue", *args],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while not (m := READY.search(open(log, errors="replace").read())):
            if time.time() > deadline or self.p.poll() is not None:
                raise RuntimeError(f"{args[0]} did not start: see {log}")
            time.sleep(0.05)
        self.url = m.group(1)

    def text(self) -> str:
        return open(self.log, errors="replace").read()

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def wait(cond, timeout: float = 60.0) -> float:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.005)
    return time.time()


def stream_times(url: str, rid: str, n: int, times: list[float]) -> None:
    body = json.dumps(
        {
            "model": "segue-mocker",
            "prompt": "the river and the sea",
            "max_tokens": n,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json", "X-Request-Id": rid}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                times.append(time.time())


def partition_round(tmp: str, stall: float, caller: float) -> tuple[float, float]:
    net = Net()
    fe_h, w1_h, w2_h = net.host("fe"), net.host("w1"), net.host("w2")
    disc = f"file:{tmp}/disc"
    procs = []
    try:
        fe = Proc(
            [
                "frontend",
                "--discovery",
                disc,
                "--host",
                fe_h.addr,
                "--port",
                "0",
                "--stall-timeout",
                str(stall),
            ],
            f"{tmp}/fe.log",
            fe_h.name,
        )
        procs.append(fe)
        w1 = Proc(
            [
                "worker",
                "--discovery",
                disc,
                "--host",
                w1_h.addr,
                "--mocker-step-ms",
                "5",
                "--caller-timeout",
                str(caller),
            ],
            f"{tmp}/w1.log",
            w1_h.name,
        )
        procs.append(w1)
        wait(lambda: len(health(fe.url)["workers"]) == 1)
        rid = f"bench-{time.time_ns()}"
        times: list[float] = []
        t = threading.Thread(target=stream_times, args=(fe.url, rid, 4000, times))
        t.start()
        wait(lambda: len(times) >= 20)
        w2 = Proc(
            ["worker", "--discovery", disc, "--host", w2_h.addr, "--mocker-speedup", "50"],
            f"{tmp}/w2.log",
            w2_h.name,
        )
        procs.append(w2)
        wait(lambda: len(health(fe.url)["workers"]) == 2)
        w1_h.partition()
        cut = time.time()
        t.join(120)
        gap = min(x for x in times if x > cut) - cut
        pattern = rf"Aborted Request ID: {rid} \(t=([0-9.]+)"
        wait(lambda: re.search(pattern, w1.text()) is not None, 60)
        m = re.search(pattern, w1.text())
        assert m
        return gap, float(m.group(1)) - cut
    finally:
        for p in procs:
            p.kill()
        net.close()
        shutil.rmtree(f"{tmp}/disc", ignore_errors=True)


def drop_round(tmp: str, disc: str, lease: float) -> float:
    """Worker killed -> gone from the frontend's /health."""
    fe = Proc(["frontend", "--discovery", disc, "--port", "0"], f"{tmp}/dfe.log")
    ws = [
        Proc(["worker", "--discovery", disc, "--lease-ttl", str(lease)], f"{tmp}/dw{i}.log")
        for i in range(2)
    ]
    try:
        wait(lambda: len(health(fe.url)["workers"]) == 2)
        victim = ws[0]
        victim.kill()
        t0 = time.time()
        t1 = wait(lambda: all(w["url"] != victim.url for w in health(fe.url)["workers"]))
        return t1 - t0
    finally:
        for p in [fe, *ws]:
            p.kill()


def etcd(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    c, p = free_port(), free_port()
    proc = subprocess.Popen(
        [
            "etcd",
            "--name",
            "b",
            "--data-dir",
            f"{tmp}/etcd",
            "--listen-client-urls",
            f"http://127.0.0.1:{c}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{c}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{p}",
            "--initial-cluster",
            f"b=http://127.0.0.1:{p}",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(1.5)
    return proc, f"etcd://127.0.0.1:{c}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stall-timeout", type=float, default=2.0)
    ap.add_argument("--caller-timeout", type=float, default=4.0)
    ap.add_argument("--lease-ttl", type=float, default=2.0)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="segue-netbench-")
    gaps, frees = [], []
    for _ in range(a.rounds):
        g, f = partition_round(tmp, a.stall_timeout, a.caller_timeout)
        gaps.append(g)
        frees.append(f)
    print(
        json.dumps(
            {
                "stall_timeout_s": a.stall_timeout,
                "partition_to_next_token_s": [round(x, 3) for x in gaps],
                "caller_timeout_s": a.caller_timeout,
                "partition_to_orphan_freed_s": [round(x, 3) for x in frees],
            }
        )
    )
    drops = {"file": [drop_round(tmp, f"file:{tmp}/fdisc", a.lease_ttl) for _ in range(a.rounds)]}
    proc, spec = etcd(tmp)
    try:
        drops["etcd"] = [drop_round(tmp, spec, a.lease_ttl) for _ in range(a.rounds)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    print(
        json.dumps(
            {
                "lease_ttl_s": a.lease_ttl,
                "worker_killed_to_gone_s": {k: [round(x, 3) for x in v] for k, v in drops.items()},
                "median": {k: round(statistics.median(v), 3) for k, v in drops.items()},
            }
        )
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
