"""How segue's costs grow with the fleet: 2 to 1,024 simulated workers (`segue worker
--replicas`) over a real etcd, behind 1 to 4 frontend processes.

For each fleet size and frontend count, in one run:
  storm      all worker processes started at once -> all registered in etcd -> every
             frontend routes to every worker
  etcd       etcd SIGKILLed and started again (same data) -> every frontend routes to all;
             then a fresh etcd (data lost) -> every worker registered again
  memory     frontend RSS per worker (after a round that sent every worker a request, so
             the frontend holds a connection to each) and sockets per worker
  cpu        frontend CPU per request (completions, --tokens each, round-robin over all
             workers, --concurrency at once), and etcd's puts, watch events and lease
             renewals per second while it runs
  host kill  a host of --host-size workers (one process) SIGKILLed under streamed load, and
             with --netns (root) a host's network cut: time until no frontend routes
             there, requests failed, answers differing from a fault-free run
  restart    a frontend SIGKILLed and started again: time until it serves all workers
In-process (no servers): the router's time per pick for each policy, and the KV index's
memory per indexed block, against the number of workers.

    python bench/fleet.py [--sizes 2,64,256,1024] [--frontends 1,4] [--host-size 64]

Standard library and segue's own dependencies only (no test extras).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import cpu_seconds, spawn, stop  # noqa: E402

from segue.etcd_cluster import Etcd  # noqa: E402
from segue.netsim import Net  # noqa: E402

MODEL = "segue-mocker"
PREFIX = "segue/default/instances/"
READY = re.compile(r"segue frontend ready url=(\S+)")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def routable(url: str) -> set[str]:
    """Ids of the workers a frontend routes to now (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503: nothing routable
        body = json.loads(e.read() or b"{}")
    except OSError:
        return set()
    return {w["id"] for w in body.get("workers", []) if w["routable"]}


def wait(cond, timeout: float, what: str, every: float = 0.02) -> float:
    """Seconds until `cond()` holds (polled); raises past `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(every)
    return time.monotonic() - t0


def etcd_counters(etcd: Etcd) -> dict[str, float]:
    """etcd's own counts: key puts, events sent to watchers, lease keep-alives and range
    reads it answered."""
    want = {
        "etcd_mvcc_put_total": "puts",
        "etcd_debugging_mvcc_events_total": "events",
        'grpc_server_msg_received_total{grpc_method="LeaseKeepAlive"': "keepalives",
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Range"': "ranges",
    }
    out = dict.fromkeys(want.values(), 0.0)
    with urllib.request.urlopen(etcd.members[0].client_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            for prefix, key in want.items():
                if line.startswith(prefix) and line[len(prefix)] in " ,}":
                    out[key] += float(line.rsplit(" ", 1)[1])
    return out


class Fleet:
    """etcd, F frontends and N workers in processes of `per` replicas."""

    def __init__(
        self, tmp: Path, n: int, frontends: int, per: int, extra: list[str], netns: bool
    ) -> None:
        self.tmp, self.n, self.per, self.extra = tmp, n, per, extra
        # With netns, the last worker process runs on a simulated host of its own (its
        # network can be cut); etcd then listens on the bridge, which every host reaches.
        self.net = Net() if netns else None
        self.host = self.net.host("fleet") if self.net else None
        self.etcd = Etcd(tmp, host=self.net.gateway if self.net else "127.0.0.1")
        self.fe_logs = [tmp / f"frontend{i}.log" for i in range(frontends)]
        self.frontends: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        for i in range(frontends):
            self.frontends.append(self._frontend(i))
        self.urls = [self._ready(i) for i in range(frontends)]

    def _frontend(self, i: int) -> subprocess.Popen[bytes]:
        log = open(self.fe_logs[i], "a")  # noqa: SIM115 - the child holds it
        args = ["frontend", "--discovery", self.etcd.spec, "--port", "0", *self.extra]
        p = spawn(args, log)
        log.close()
        return p

    def _ready(self, i: int, after: int = 0) -> str:
        found: list[str] = []

        def ready() -> bool:
            found[:] = READY.findall(self.fe_logs[i].read_text())
            return len(found) > after

        wait(ready, 60, f"frontend {i} ready")
        return found[-1]

    def start_workers(self) -> None:
        args = ["worker", "--discovery", self.etcd.spec, "--mocker-step-ms", "5"]
        with open(self.tmp / "workers.log", "a") as log:
            for k in range(0, self.n, self.per):
                argv = [*args, "--replicas", str(min(self.per, self.n - k))]
                if self.host is not None and k + self.per >= self.n:  # the last one
                    argv = ["ip", "netns", "exec", self.host.name, sys.executable, "-m",
                            "segue", *argv, "--host", self.host.addr]  # fmt: skip
                    p = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
                    self.workers.append(p)
                else:
                    self.workers.append(spawn(argv, log))

    def all_routable(self, urls: list[str] | None = None) -> bool:
        return all(len(routable(u)) >= self.n for u in (urls or self.urls))

    def restart_frontend(self, i: int) -> tuple[float, float]:
        """SIGKILL frontend i, start it again: seconds to its ready line, to all routable."""
        os.killpg(self.frontends[i].pid, signal.SIGKILL)
        self.frontends[i].wait()
        before = len(READY.findall(self.fe_logs[i].read_text()))
        t0 = time.monotonic()
        self.frontends[i] = self._frontend(i)
        self.urls[i] = self._ready(i, before)
        ready = time.monotonic() - t0
        wait(lambda: self.all_routable([self.urls[i]]), 60, "restarted frontend routes to all")
        return ready, time.monotonic() - t0

    def close(self) -> None:
        stop(self.workers + self.frontends, timeout=20)
        self.etcd.stop()
        if self.net is not None:
            self.net.close()


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url + "/v1/completions", json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data}")
        return data


async def _stream(session: aiohttp.ClientSession, url: str, body: dict) -> str:
    text = []
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                ev = json.loads(line[6:])
                if "error" in ev:
                    raise RuntimeError(str(ev["error"]))
                text.append(ev["choices"][0]["text"])
    return "".join(text)


def body(i: int, tokens: int) -> dict:
    return {"model": MODEL, "prompt": f"request {i} of the fleet", "max_tokens": tokens,
            "temperature": 0}  # fmt: skip


async def load(urls: list[str], n: int, conc: int, tokens: int) -> list[float]:
    """`n` completions, `conc` at once, spread over the frontends; their latencies."""
    lat: list[float] = []
    todo = iter(range(n))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def client() -> None:
            for i in todo:
                t0 = time.perf_counter()
                await _post(s, urls[i % len(urls)], body(i, tokens))
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(conc)))
    return lat


async def streamed(urls: list[str], ids: list[int], conc: int, tokens: int) -> dict[int, str]:
    """Streamed completions of `ids`; each answer's text, or the error's."""
    out: dict[int, str] = {}
    todo = iter(ids)
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def client() -> None:
            for i in todo:
                try:
                    out[i] = await _stream(s, urls[i % len(urls)], body(i, tokens))
                except Exception as e:  # noqa: BLE001 - counted as failed
                    out[i] = f"ERROR {e}"

        await asyncio.gather(*(client() for _ in range(conc)))
    return out


def measure(args: argparse.Namespace, n: int, f: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="segue-fleet-"))
    row: dict = {"workers": n, "frontends": f}
    netns = args.netns and n > args.host_size
    fleet = Fleet(tmp, n, f, min(args.host_size, n), args.frontend_args.split(), netns)
    try:
        fe_rss0 = [rss_kib(p.pid) for p in fleet.frontends]
        # storm
        t0 = time.monotonic()
        fleet.start_workers()
        wait(lambda: fleet.etcd.count_keys(PREFIX) >= n, 120, "all registered", 0.05)
        row["registered_s"] = time.monotonic() - t0
        wait(fleet.all_routable, 120, "every frontend routes to every worker", 0.05)
        row["storm_s"] = time.monotonic() - t0
        # memory and connections, after every worker served a request through each frontend
        asyncio.run(load(fleet.urls, n * f, 32, 1))
        fe_rss = [rss_kib(p.pid) for p in fleet.frontends]
        row["rss_kib_per_worker"] = statistics.mean(
            (a - b) / n for a, b in zip(fe_rss, fe_rss0, strict=True)
        )
        row["frontend_rss_mib"] = statistics.mean(fe_rss) / 1024
        row["sockets_per_worker"] = statistics.mean(sockets(p.pid) for p in fleet.frontends) / n
        # CPU per request, and etcd's traffic meanwhile
        asyncio.run(load(fleet.urls, args.requests // 4, args.concurrency, args.tokens))
        cpu0 = sum(cpu_seconds(p.pid) for p in fleet.frontends)
        ec0, t0 = etcd_counters(fleet.etcd), time.monotonic()
        lat = asyncio.run(load(fleet.urls, args.requests, args.concurrency, args.tokens))
        dt = time.monotonic() - t0
        ec1 = etcd_counters(fleet.etcd)
        row["cpu_ms_per_request"] = (
            (sum(cpu_seconds(p.pid) for p in fleet.frontends) - cpu0) / args.requests * 1e3
        )
        row["p50_ms"] = statistics.median(lat) * 1e3
        for k in ("puts", "events", "keepalives", "ranges"):
            row[f"etcd_{k}_per_s"] = (ec1[k] - ec0[k]) / dt
        # etcd restarted (same data): every frontend routes to all again
        fleet.etcd.members[0].kill()
        t0 = time.monotonic()
        fleet.etcd.restart(0)
        wait(fleet.all_routable, 120, "routable after the etcd restart", 0.05)
        row["etcd_restart_s"] = time.monotonic() - t0
        # a fresh etcd (its data lost): every worker registers again
        fleet.etcd.members[0].kill()
        shutil.rmtree(fleet.etcd.members[0].tmp / "etcd0.data")
        t0 = time.monotonic()
        fleet.etcd.members[0].start(fleet.etcd.cluster)
        fleet.etcd.wait_healthy()
        wait(lambda: fleet.etcd.count_keys(PREFIX) >= n, 120, "re-registered", 0.05)
        row["etcd_lost_reregistered_s"] = time.monotonic() - t0
        wait(fleet.all_routable, 120, "routable after the fresh etcd", 0.05)
        row["etcd_lost_routable_s"] = time.monotonic() - t0
        # frontend restarted
        row["frontend_ready_s"], row["frontend_routable_s"] = fleet.restart_frontend(0)
        if netns:
            row.update(host_fault(args, fleet, "cut"))
        if n > args.host_size:
            row.update(host_fault(args, fleet, "kill"))
    finally:
        fleet.close()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return row


def host_fault(args: argparse.Namespace, fleet: Fleet, how: str) -> dict:
    """A host of --host-size workers (one process) SIGKILLed (`kill`: the second-to-last
    process when the last is on a simulated host) or its network cut (`cut`: the last,
    healed after) under streamed load."""
    # enough requests that round-robin sends some to every worker, the victim's included
    ids = list(range(10_000, 10_000 + max(args.kill_requests, 2 * fleet.n)))
    reference = asyncio.run(streamed(fleet.urls, ids, 64, args.kill_tokens))
    victim = fleet.workers[-2 if how == "kill" and fleet.host else -1]
    before = routable(fleet.urls[0])
    out: dict[int, str] = {}

    with urllib.request.urlopen(fleet.urls[0] + "/health", timeout=5) as r:
        urls = [w["url"] for w in json.loads(r.read())["workers"] if w["pid"] == victim.pid]

    async def running(s: aiohttp.ClientSession) -> int:
        """Requests running on the victim's workers now."""
        n = 0
        for u in urls:
            async with s.get(u + "/health") as r:
                n += (await r.json())["engine"]["running"]
        return n

    async def run() -> float:
        task = asyncio.create_task(streamed(fleet.urls, ids, 128, args.kill_tokens))
        async with aiohttp.ClientSession() as s:  # strike while the host holds requests
            while not await running(s) and not task.done():
                await asyncio.sleep(0.05)
        if how == "cut":
            assert fleet.host is not None
            fleet.host.partition()
        else:
            os.killpg(victim.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        gone = n_left = len(before)
        while n_left > len(before) - args.host_size:
            n_left = min(len(routable(u)) for u in fleet.urls)
            await asyncio.sleep(0.05)
        gone = time.monotonic() - t_kill
        out.update(await task)
        return gone

    gone_s = asyncio.run(run())
    if how == "cut":
        assert fleet.host is not None
        fleet.host.heal()
    else:
        victim.wait()
    failed = sum(1 for v in out.values() if v.startswith("ERROR"))
    wrong = sum(1 for i in ids if not out[i].startswith("ERROR") and out[i] != reference[i])
    return {f"host_{how}_gone_s": gone_s, f"host_{how}_failed": failed,
            f"host_{how}_wrong": wrong, "host_requests": len(ids)}  # fmt: skip


def router_picks(sizes: list[int]) -> list[dict]:
    """Microseconds per pick of each policy with N workers (no I/O), 32 calls in flight;
    for kv, a 1,000-token prompt whose first half 8 workers cache."""
    from segue.blocks import block_hashes
    from segue.discovery import Instance
    from segue.protocol import KvSnapshot, Role
    from segue.router import Policy, Router

    rows = []
    tokens = list(range(1000))
    for n in sizes:
        row: dict = {"workers": n}
        for policy in Policy:
            r = Router(policy)
            r.update({f"w{i}": Instance(f"w{i}", Role.AGGREGATED, f"http://w{i}", i, "h")
                      for i in range(n)})  # fmt: skip
            if policy is Policy.KV:  # 8 workers (or all) cache the prompt's first half
                hashes = block_hashes(tokens[:500], 16)
                for i in range(0, n, max(1, n // 8)):
                    r.kv_index.snapshot(f"w{i}", KvSnapshot(1, 16, 4096, hashes))
            reps = 5000
            with contextlib.ExitStack() as busy:  # 32 calls in flight, as under load
                for k in range(32):
                    busy.enter_context(r.track(r.instances[f"w{k * 7 % n}"], len(tokens)))
                t0 = time.perf_counter()
                for _ in range(reps):
                    inst = r.pick([Role.AGGREGATED], tokens=tokens)
                    assert inst is not None
                    with r.track(inst, len(tokens)):
                        pass
                row[policy.value] = (time.perf_counter() - t0) / reps * 1e6
        rows.append(row)
    return rows


def kv_index_memory(sizes: list[int], blocks: int = 1000) -> list[dict]:
    """Bytes per indexed (worker, block) pair: each worker caches `blocks` blocks, half of
    them a prefix every worker shares."""
    from segue.protocol import KvSnapshot
    from segue.router.kv_index import KvIndex

    rows = []
    rng = random.Random(0)
    shared = [rng.getrandbits(63) for _ in range(blocks // 2)]
    for n in sizes:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        idx = KvIndex()
        for i in range(n):
            own = [rng.getrandbits(63) for _ in range(blocks - len(shared))]
            idx.snapshot(f"w{i}", KvSnapshot(1, 16, blocks, shared + own))
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        rows.append({"workers": n, "pairs": idx.size, "bytes_per_pair": used / idx.size})
        del idx
    return rows


TIMES = ["workers", "frontends", "registered_s", "storm_s", "etcd_restart_s",
         "etcd_lost_reregistered_s", "etcd_lost_routable_s", "frontend_ready_s",
         "frontend_routable_s"]  # fmt: skip
COSTS = ["workers", "frontends", "frontend_rss_mib", "rss_kib_per_worker", "sockets_per_worker",
         "cpu_ms_per_request", "p50_ms", "etcd_puts_per_s", "etcd_events_per_s",
         "etcd_keepalives_per_s", "etcd_ranges_per_s"]  # fmt: skip
HOST_KILL = ["workers", "frontends", "host_requests", "host_kill_gone_s", "host_kill_failed",
             "host_kill_wrong", "host_cut_gone_s", "host_cut_failed", "host_cut_wrong"]  # fmt: skip


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2,64,256,1024")
    ap.add_argument("--frontends", default="1,4", help="frontend process counts")
    ap.add_argument("--host-size", type=int, default=64, help="workers per process (a host)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--kill-requests", type=int, default=400, help="at least 2 per worker")
    ap.add_argument("--kill-tokens", type=int, default=100)
    ap.add_argument("--frontend-args", default="", help="extra flags for every frontend")
    ap.add_argument("--skip-servers", action="store_true", help="only the in-process parts")
    ap.add_argument(
        "--netns", action="store_true", help="also cut a host's network (root: a namespace)"
    )
    ap.add_argument("--json", help="write every row here too")
    ap.add_argument("--keep", action="store_true", help="keep the logs (and etcd's data)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    picks = router_picks(sizes)
    print("## router: microseconds per pick (and its bookkeeping)\n")
    print(table(picks, ["workers", *(p for p in picks[0] if p != "workers")]))
    mem = kv_index_memory(sizes)
    print("\n## KV index memory per indexed (worker, block) pair\n")
    print(table(mem, ["workers", "pairs", "bytes_per_pair"]))
    rows = []
    if not args.skip_servers:
        for f in (int(x) for x in args.frontends.split(",")):
            for n in sizes:
                rows.append(measure(args, n, f))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print("\n## the fleet over etcd\n")
        print(table(rows, TIMES))
        print()
        print(table(rows, COSTS))
        killed = [r for r in rows if "host_requests" in r]
        if killed:
            print()
            print(table(killed, HOST_KILL))
    if args.json:
        Path(args.json).write_text(json.dumps({"picks": picks, "kv": mem, "fleet": rows}))


if __name__ == "__main__":
    main()
