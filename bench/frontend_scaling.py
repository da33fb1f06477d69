"""Frontend scaling: requests/s and CPU per request for `segue frontend --processes N`, with
enough mocker workers and load generators that the frontend is what limits. Meant for a
machine with many cores (the development machines have 2).

    python bench/frontend_scaling.py --processes 1,2,4,8 --workers 6 --clients 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def tree(pid: int) -> list[int]:
    """pid and its children (the frontend's processes)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except OSError:
                pass
    return [pid, *kids]


def spawn(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "segue", "--log-level", "WARNING", *args],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def wait_workers(url: str, n: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if len(json.loads(r.read())["workers"]) >= n:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("workers not seen")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", default="1,2,4,8")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--clients", type=int, default=512)
    ap.add_argument("--load-procs", type=int, default=4, help="load generator processes")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--step-ms", type=float, default=5.0, help="mocker decode step (0: instant)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8795)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="segue-scale-")
    disc = f"file:{tmp}/d"
    log = open(os.path.join(tmp, "procs.log"), "w")
    timing = (
        ["--mocker-speedup", "1e9"]
        if a.step_ms == 0
        else ["--mocker-step-ms", str(a.step_ms), "--mocker-batch-slowdown", "0"]
    )
    workers = [spawn(["worker", "--discovery", disc, *timing], log) for _ in range(a.workers)]
    try:
        for n in [int(x) for x in a.processes.split(",")]:
            fe = spawn(
                ["frontend", "--discovery", disc, "--port", str(a.port), "--processes", str(n)], log
            )
            url = f"http://127.0.0.1:{a.port}"
            try:
                wait_workers(url, a.workers)
                time.sleep(1)
                fe_pids = tree(fe.pid)
                before_fe = sum(cpu_seconds(p) for p in fe_pids)
                before_w = sum(cpu_seconds(w.pid) for w in workers)
                per = max(1, a.clients // a.load_procs)
                loads = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "segue",
                            "bench",
                            "--url",
                            url,
                            "--concurrency",
                            str(per),
                            "--duration",
                            str(a.duration),
                            "--max-tokens",
                            str(a.max_tokens),
                            "--ignore-eos",
                            "--json",
                            "--no-progress",
                            "--warmup",
                            "1",
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(a.load_procs)
                ]
                outs = [json.loads(p.communicate()[0])[0] for p in loads]
                fe_cpu = sum(cpu_seconds(p) for p in fe_pids) - before_fe
                w_cpu = sum(cpu_seconds(w.pid) for w in workers) - before_w
                reqs = sum(o["requests"] for o in outs)
                rps = sum(o["requests_per_s"] for o in outs)
                print(
                    json.dumps(
                        {
                            "frontend_processes": n,
                            "clients": per * a.load_procs,
                            "requests_per_s": round(rps, 1),
                            "frontend_cpu_ms_per_req": round(1000 * fe_cpu / max(reqs, 1), 3),
                            "worker_cpu_ms_per_req": round(1000 * w_cpu / max(reqs, 1), 3),
                            "errors": sum(o["errors"] for o in outs),
                            "ttft_ms_p50": round(max(o["ttft_ms_p50"] for o in outs), 2),
                        }
                    ),
                    flush=True,
                )
            finally:
                fe.send_signal(signal.SIGTERM)
                try:
                    fe.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(fe.pid, signal.SIGKILL)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
