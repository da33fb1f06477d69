"""segue against NVIDIA Dynamo 1.6.1 in one run, alternating, on the same machine: a frontend
and 2 mocker workers each, the same tokenizer, `segue bench` as the client for both (64
keep-alive streaming clients, ~100-token prompts, 32 tokens out), CPU per request of the
frontend and of the workers from /proc, SSE events per request. Two workloads: a near-instant
mocker (segue coalesces tokens into fewer events) and ~5.8 ms decode steps (one event per
token on both, as with a real engine).

    python bench/vs_dynamo.py                                   # segue only
    python bench/vs_dynamo.py --dynamo-anchor ../shared/dynamo-anchor --rounds 2

`--dynamo-anchor` is a directory with Dynamo's start.sh/stop.sh (they read DYNAMO_VENV for
the Python that has Dynamo: `--dynamo-python` sets it from that interpreter's venv).
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
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
WORKLOADS = {
    # name: (segue mocker flags, Dynamo SPEEDUP)
    "instant": (["--mocker-speedup", "1e9"], "1000"),
    "per-token": (["--mocker-step-ms", "5.8", "--mocker-batch-slowdown", "0"], "1"),
}


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                pass
    return out


def run_load(url: str, model: str, c: int, duration: float) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segue",
            "bench",
            "--url",
            url,
            "--model",
            model,
            "--concurrency",
            str(c),
            "--duration",
            str(duration),
            "--prompt-tokens",
            "100",
            "--max-tokens",
            "32",
            "--ignore-eos",
            "--json",
            "--no-progress",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)[0]


def measure(
    url: str, model: str, fe: list[int], workers: list[int], c: int, duration: float
) -> dict:
    b_fe, b_w = cpu(fe), cpu(workers)
    r = run_load(url, model, c, duration)
    n = max(r["requests"], 1)
    return {
        "requests_per_s": r["requests_per_s"],
        "frontend_cpu_ms_per_req": round(1000 * (cpu(fe) - b_fe) / n, 3),
        "workers_cpu_ms_per_req": round(1000 * (cpu(workers) - b_w) / n, 3),
        "sse_events_per_req": r["sse_events_per_req"],
        "errors": r["errors"],
        "ttft_ms_p50": r["ttft_ms_p50"],
    }


def wait_health(url: str, workers: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if len(json.loads(r.read()).get("workers", [])) >= workers:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def segue_run(model_dir: str, flags: list[str], c: int, duration: float, port: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="segue-vs-")
    disc = f"file:{tmp}/d"
    log = open(f"{tmp}/log", "w")
    cmd = [sys.executable, "-m", "segue", "--log-level", "WARNING"]
    ws = [
        subprocess.Popen(
            [*cmd, "worker", "--discovery", disc, "--model", model_dir, *flags],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    fe = subprocess.Popen(
        [*cmd, "frontend", "--discovery", disc, "--port", str(port), "--model", model_dir],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, 2)
        return measure(url, Path(model_dir).name, [fe.pid], [w.pid for w in ws], c, duration)
    finally:
        for p in [fe, *ws]:
            p.send_signal(signal.SIGTERM)
        for p in [fe, *ws]:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def dynamo_run(anchor: str, env: dict, speedup: str, c: int, duration: float) -> dict:
    env = {**env, "SPEEDUP": speedup, "NUM_WORKERS": "2", "DYN_LOG": "warn"}
    out = subprocess.run([f"{anchor}/start.sh"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"Dynamo did not start: {out.stderr[-500:]}")
    port = re.search(r"PORT=(\d+)", out.stdout).group(1)  # type: ignore[union-attr]
    run_dir = env["DYNAMO_RUN_DIR"]
    try:
        pids = {p.stem: int(p.read_text()) for p in Path(run_dir).glob("*.pid")}
        fe = [pids.pop("frontend")]
        fe += children(fe[0])
        workers = [x for pid in pids.values() for x in [pid, *children(pid)]]
        return measure(f"http://127.0.0.1:{port}", "tiny", fe, workers, c, duration)
    finally:
        subprocess.run([f"{anchor}/stop.sh"], env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dynamo-anchor", default=None, help="dir with Dynamo's start.sh/stop.sh")
    ap.add_argument("--dynamo-python", default=None, help="the Python that has Dynamo 1.6.1")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--port", type=int, default=8797)
    a = ap.parse_args()
    env = dict(os.environ)
    run_dir = tempfile.mkdtemp(prefix="dynamo-vs-")
    env["DYNAMO_RUN_DIR"] = run_dir
    if a.dynamo_python:
        env["DYNAMO_VENV"] = str(Path(a.dynamo_python).absolute().parent.parent)
    model_dir = os.path.join(run_dir, "model")
    if a.dynamo_anchor:  # the tokenizer Dynamo will use, made by its own script
        py = os.path.join(env.get("DYNAMO_VENV", ""), "bin", "python")
        subprocess.run(
            [py, f"{a.dynamo_anchor}/make_tiny_model.py", model_dir],
            check=True,
            capture_output=True,
        )
    else:
        subprocess.run(
            [sys.executable, "-m", "segue", "make-model", model_dir],
            check=True,
            capture_output=True,
        )
    try:
        for rnd in range(a.rounds):
            for name, (flags, speedup) in WORKLOADS.items():
                r = segue_run(model_dir, flags, a.concurrency, a.duration, a.port)
                print(
                    json.dumps({"round": rnd, "workload": name, "system": "segue", **r}), flush=True
                )
                if a.dynamo_anchor:
                    r = dynamo_run(a.dynamo_anchor, env, speedup, a.concurrency, a.duration)
                    print(
                        json.dumps({"round": rnd, "workload": name, "system": "dynamo", **r}),
                        flush=True,
                    )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
