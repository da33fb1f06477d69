"""The gap a streaming client sees when its worker is SIGKILLed mid-stream.

Frontend + 2 mocker workers (5 ms decode steps). For each trial a long greedy stream runs,
the worker holding it is killed after 50 tokens, and we time kill -> next token at the
client. The mocker's re-prefill of prompt + generated tokens is reported separately (it is
simulated work any engine must redo). Afterwards we check that no request was ever sent to
the dead worker (no connection_refused migrations).

    python bench/migration_gap.py --trials 10
    python bench/migration_gap.py --prompt-tokens 4000 --prefill-tps 20000 --router kv --warm

With `--warm`, before each trial one request per worker (through a second, round-robin
frontend) puts the prompt in every worker's prefix cache, so with `--router kv` the request
moves to a worker that only has to prefill what was generated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Deployment, scrape  # noqa: E402


def warm_up(url: str, prompt_tokens: int) -> None:
    body = {"model": "segue-mocker", "prompt": " ".join(["the"] * prompt_tokens), "max_tokens": 1}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def wait_indexed(url: str, blocks: int) -> None:
    """Until the routing frontend's KV index shows the prompt on every worker."""
    deadline = time.time() + 30
    while time.time() < deadline:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            workers = json.loads(r.read())["workers"]
        if all((w["kv_blocks"] or 0) >= blocks for w in workers):
            return
        time.sleep(0.05)
    raise TimeoutError("the KV index did not show the warmed prompt")


def trial(d: Deployment, i: int, prompt_tokens: int) -> dict:
    rid = f"gap-{i}"
    body = {
        "model": "segue-mocker",
        "prompt": " ".join(["the"] * prompt_tokens),
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    times: list[tuple[float, int]] = []
    t_kill = None
    req = urllib.request.Request(
        d.url + "/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-Request-Id": rid},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: {"):
                continue
            n = len(json.loads(line[6:])["choices"][0]["token_ids"])
            now = time.perf_counter()
            if t_kill is None and n:
                times.append((now, n))
                if sum(k for _, k in times) >= 50:
                    victim = next(
                        w for w in d.workers if w.alive() and f"New Request ID: {rid}" in w.log()
                    )
                    t_kill = time.perf_counter()
                    victim.signal(signal.SIGKILL)
                    victim.popen.wait()
                    after = None
            elif t_kill is not None and n and after is None:
                after = now
    gaps = [b[0] - a[0] for a, b in zip(times, times[1:], strict=False)]
    return {
        "gap_ms": (after - t_kill) * 1000,
        "step_ms": statistics.median(gaps) * 1000,
        "victim": victim,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--prefill-tps", type=float, default=50000)
    ap.add_argument("--router", default="round-robin")
    ap.add_argument("--warm", action="store_true", help="cache the prompt on every worker first")
    a = ap.parse_args()
    d = Deployment(Path(tempfile.mkdtemp(prefix="segue-gap-")))
    mocker = ["--mocker-step-ms", "5", "--mocker-prefill-tps", str(a.prefill_tps)]
    try:
        warm = d.start_frontend() if a.warm else None
        d.start_frontend("--router", a.router)
        d.start_worker(*mocker, fast=False)
        d.start_worker(*mocker, fast=False)
        res = []
        for i in range(a.trials):
            if warm is not None:
                for _ in d.workers:
                    warm_up(warm.url, a.prompt_tokens)
                if a.router == "kv":
                    wait_indexed(d.url, a.prompt_tokens // 16)
            r = trial(d, i, a.prompt_tokens)
            d.workers.remove(r.pop("victim"))
            d.start_worker(*mocker, fast=False)
            res.append(r)
        m = scrape(d.url)
        refused = m.get('segue_frontend_migrations_total{reason="connection_refused"}', 0)
        gaps = sorted(r["gap_ms"] for r in res)
        reprefill_ms = (a.prompt_tokens + 50) / a.prefill_tps * 1000
        print(
            json.dumps(
                {
                    "router": a.router,
                    "warm": a.warm,
                    "prompt_tokens": a.prompt_tokens,
                    "trials": a.trials,
                    "gap_ms_p50": round(statistics.median(gaps), 2),
                    "gap_ms_max": round(gaps[-1], 2),
                    "decode_step_ms_p50": round(statistics.median(r["step_ms"] for r in res), 2),
                    "mocker_reprefill_ms_uncached": round(reprefill_ms, 2),
                    "requests_sent_to_dead_worker": int(refused),
                }
            )
        )
    finally:
        d.stop()
        shutil.rmtree(d.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
