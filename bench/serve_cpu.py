"""Start a frontend + N near-instant mocker workers, drive them with `segue bench`, and
print requests/s and the CPU each process spent per request (from /proc/PID/stat).

    python bench/serve_cpu.py --concurrency 1,64 --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+)", f.read())
    return int(m.group(1)) / 1024 if m else 0.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "segue", *args], stdout=log, stderr=log, start_new_session=True
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="mocker decode step; 0 (default): near-instant, tokens coalesce; 5: one "
        "SSE event per token, as with a real engine",
    )
    ap.add_argument(
        "--discovery",
        choices=["file", "etcd"],
        default="file",
        help="etcd: start Debian's etcd on free local ports for the run",
    )
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="segue-bench-")
    disc = f"file:{tmp}"
    etcd = None
    if a.discovery == "etcd":
        c, p = free_port(), free_port()
        etcd = subprocess.Popen(
            [
                "etcd",
                "--name",
                "b",
                "--data-dir",
                os.path.join(tmp, "etcd"),
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        disc = f"etcd://127.0.0.1:{c}"
        time.sleep(1.5)
    log = open(os.path.join(tmp, "procs.log"), "w")
    timing = (
        ["--mocker-speedup", "1e9"]
        if a.step_ms == 0
        else ["--mocker-step-ms", str(a.step_ms), "--mocker-batch-slowdown", "0"]
    )
    workers = [
        spawn(
            ["--log-level", "WARNING", "worker", "--discovery", disc, *timing],
            log,
        )
        for _ in range(a.workers)
    ]
    fe = spawn(
        ["--log-level", "WARNING", "frontend", "--discovery", disc, "--port", str(a.port)], log
    )
    url = f"http://127.0.0.1:{a.port}"
    procs = [fe, *workers]
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if len(json.loads(r.read())["workers"]) == a.workers:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        for c in a.concurrency.split(","):
            before = [cpu_seconds(p.pid) for p in procs]
            cmd = [
                sys.executable,
                "-m",
                "segue",
                "bench",
                "--url",
                url,
                "--concurrency",
                c,
                "--duration",
                str(a.duration),
                "--prompt-tokens",
                str(a.prompt_tokens),
                "--max-tokens",
                str(a.max_tokens),
                "--json",
                "--no-progress",
                "--warmup",
                "0",
            ]
            if a.no_stream:
                cmd.append("--no-stream")
            res = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            )[0]
            spent = [cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)]
            n = max(res["requests"], 1)
            print(
                json.dumps(
                    {
                        "concurrency": int(c),
                        "requests": res["requests"],
                        "errors": res["errors"],
                        "requests_per_s": res["requests_per_s"],
                        "output_tokens_per_s": res["output_tokens_per_s"],
                        "latency_ms_p50": res["latency_ms_p50"],
                        "ttft_ms_p50": res["ttft_ms_p50"],
                        "frontend_cpu_ms_per_req": round(spent[0] / n * 1000, 3),
                        "worker_cpu_ms_per_req": round(sum(spent[1:]) / n * 1000, 3),
                        "frontend_rss_mib": round(rss_mib(fe.pid), 1),
                    }
                )
            )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if etcd is not None:
            os.killpg(etcd.pid, signal.SIGKILL)
            etcd.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
