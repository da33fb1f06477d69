"""The Responses API's costs, side by side in one run.

1. Resume gap: two frontends share discovery and the response store (the SQLite file, or
   Redis with --store-url); a background streamed response runs at frontend A; after 10
   events A is SIGKILLed and the client asks frontend B for the events after the last it
   has. Timed: the GET's send -> its first event (stored ones come at once), and the
   longest wait between the next 60 events (B takes the response over and continues it
   from its stored tokens on a worker: the prefill of prompt + tokens so far). A is
   started again for the next trial.
2. Frontend CPU per request: streamed /v1/responses against streamed /v1/chat/completions
   of the same tokens (greedy, --tokens each), alternated in rounds at --concurrency, the
   frontend's CPU time divided by the requests; stored and background responses too.
   With Redis as the store, also the store operations per response (Redis's own count of
   the commands it ran, INFO commandstats).

    python bench/responses.py [--trials 20] [--requests 200] [--store-url redis://...]

Standard library only (the clients are urllib and raw sockets).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import cpu_seconds  # noqa: E402
from harness import Deployment  # noqa: E402

MODEL = "segue-mocker"
PROMPT = "the river and the sea"


def post(url: str, path: str, body: dict):
    req = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=120)


def sse_events(resp):
    """The `data:` payloads of an SSE response, decoded, as they come."""
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def gap_trial(d: Deployment, extra: tuple[str, ...]) -> float:
    b, a = d.frontends[0], d.frontends[-1]  # B stays; A is started again each trial
    body = {"model": MODEL, "input": PROMPT, "max_output_tokens": 2000, "temperature": 0,
            "background": True, "stream": True}  # fmt: skip
    resp = post(a.url, "/v1/responses", body)
    events = sse_events(resp)
    head = [next(events) for _ in range(10)]
    rid, n = head[0]["response"]["id"], head[-1]["sequence_number"]
    time.sleep(0.1)  # what the client has is stored (batches every 50 ms)
    a.signal(signal.SIGKILL)
    a.popen.wait(10)
    resp.close()
    t0 = time.perf_counter()
    url = f"{b.url}/v1/responses/{rid}?stream=true&starting_after={n}"
    with urllib.request.urlopen(url, timeout=60) as r:
        events = sse_events(r)
        first = next(events)
        gap = time.perf_counter() - t0
        stall, last = 0.0, time.perf_counter()
        for _ in range(60):  # the stored events, then the taker's: the longest wait
            next(events)
            now = time.perf_counter()
            stall, last = max(stall, now - last), now
    assert first["sequence_number"] == n + 1, first
    urllib.request.urlopen(
        urllib.request.Request(f"{b.url}/v1/responses/{rid}/cancel", b"", method="POST"),
        timeout=30,
    ).read()
    d.procs.remove(a)
    d.frontends.remove(a)
    d.start_frontend(*extra)  # the next trial's A
    return gap, stall


def read_stream(url: str, path: str, body: dict) -> int:
    with post(url, path, body) as r:
        return sum(1 for _ in sse_events(r))


def redis_commands(url: str) -> int:
    """The commands Redis has run so far (0 without Redis), not counting INFO itself."""
    if not url:
        return 0
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


def cpu_per_request(
    d: Deployment, a: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    fe = d.frontends[0]
    common = {"model": MODEL, "temperature": 0, "stream": True}
    kinds = {
        "chat": ("/v1/chat/completions", {**common, "max_tokens": a.tokens,
                 "messages": [{"role": "user", "content": PROMPT}]}),
        "responses (store false)": ("/v1/responses", {**common, "input": PROMPT,
                 "max_output_tokens": a.tokens, "store": False}),
        "responses (stored)": ("/v1/responses", {**common, "input": PROMPT,
                 "max_output_tokens": a.tokens}),
        "responses (background)": ("/v1/responses", {**common, "input": PROMPT,
                 "max_output_tokens": a.tokens, "background": True}),
    }  # fmt: skip
    cpu = dict.fromkeys(kinds, 0.0)
    ops = dict.fromkeys(kinds, 0)
    count = dict.fromkeys(kinds, 0)
    per_round = max(a.concurrency, a.requests // a.rounds)
    for _ in range(a.rounds):
        for name, (path, body) in kinds.items():
            before, ops_before = cpu_seconds(fe.pid), redis_commands(a.store_url)
            threads = [
                threading.Thread(target=read_stream, args=(fe.url, path, body))
                for _ in range(per_round)
            ]
            for i in range(0, per_round, a.concurrency):
                batch = threads[i : i + a.concurrency]
                for t in batch:
                    t.start()
                for t in batch:
                    t.join()
            cpu[name] += cpu_seconds(fe.pid) - before
            ops[name] += redis_commands(a.store_url) - ops_before
            count[name] += per_round
    return {k: 1000 * cpu[k] / count[k] for k in kinds}, {k: ops[k] / count[k] for k in kinds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--requests", type=int, default=200, help="per kind")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--store-url", default="", help="redis://HOST:PORT/DB (default: SQLite)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="segue-bench-") as tmp:
        d = Deployment(Path(tmp))
        extra = ("--store", a.store_url) if a.store_url else ()
        try:
            d.start_frontend(*extra)
            d.start_frontend(*extra)
            d.start_worker("--mocker-step-ms", "5")
            d.start_worker("--mocker-step-ms", "5")
            trials = [gap_trial(d, extra) for _ in range(a.trials)]
            for i, what in enumerate(("first resumed event", "longest wait in the next 60")):
                ms = sorted(1000 * t[i] for t in trials)
                print(f"resume after a frontend SIGKILL ({a.trials} trials, store "
                      f"{a.store_url or 'sqlite'}), {what}: p50 {statistics.median(ms):.1f} "
                      f"ms, max {ms[-1]:.1f} ms")  # fmt: skip
            cpu, ops = cpu_per_request(d, a)
            for name, ms in cpu.items():
                print(f"frontend CPU per streamed request, {name}: {ms:.2f} ms", end="")
                print(f", {ops[name]:.1f} store operations" if a.store_url else "")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
