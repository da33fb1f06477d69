"""Live moves: the gap a streaming client sees when its request moves to another worker, by
context length, with the KV (live) and without it (the next worker recomputes the context);
and a rolling restart of every worker under load, live against drain-then-hand-back.

    python bench/live_migration.py                          # gap at 1k, 4k, 16k tokens
    python bench/live_migration.py --rolling --workers 3    # rolling restart under load

The move is made with the worker admin call (`POST /admin/move`, `"live": false` for
recompute). The mocker prefills at `--prefill-tps` (5,000 tokens/s by default, a realistic
rate for a large model) and its simulated KV is `--kv-bytes-per-token` bytes per token.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Deployment, Proc  # noqa: E402

from segue.tokenizer import BuiltinTokenizer  # noqa: E402

_tok = BuiltinTokenizer()
VOCAB = [_tok.decode([i]).strip() for i in _tok.output_vocab()]


def prompt_of(tokens: int, salt: int) -> str:
    """`tokens` one-token words, different per salt (no prefix shared between trials)."""
    return " ".join(VOCAB[(i * 7 + salt * 13 + i // 5) % len(VOCAB)] for i in range(tokens))


def post(url: str, path: str, body: dict, rid: str = "") -> urllib.request.Request:
    headers = {"Content-Type": "application/json", **({"X-Request-Id": rid} if rid else {})}
    return urllib.request.Request(url + path, json.dumps(body).encode(), headers)


def stream(url: str, prompt: str, max_tokens: int, rid: str, on_token=None) -> tuple[list, list]:
    """Token ids and their arrival times; `on_token(n)` after each event."""
    body = {
        "model": "segue-mocker",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    ids: list[int] = []
    times: list[float] = []
    with urllib.request.urlopen(post(url, "/v1/completions", body, rid), timeout=300) as r:
        for raw in r:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: {"):
                continue
            new = json.loads(line[6:])["choices"][0].get("token_ids") or []
            now = time.perf_counter()
            for t in new:
                ids.append(t)
                times.append(now)
            if on_token is not None and new:
                on_token(len(ids))
    return ids, times


def holder(d: Deployment, rid: str) -> Proc:
    return next(w for w in d.workers if w.alive() and f"New Request ID: {rid}" in w.log())


def gap_trial(d: Deployment, context: int, live: bool, salt: int) -> float:
    rid = f"gap-{context}-{live}-{salt}"
    moved_at: list[float] = []

    moved: list[list[str]] = []

    def move() -> None:
        body = {"request_id": rid, "live": live}
        req = post(holder(d, rid).url, "/admin/move", body)
        with urllib.request.urlopen(req, timeout=30) as r:
            moved.append(json.loads(r.read())["moved"])

    mover = threading.Thread(target=move)

    def on_token(n: int) -> None:  # the move goes out beside the stream, not blocking it
        if n >= 20 and not moved_at:
            moved_at.append(time.perf_counter())
            mover.start()

    _, times = stream(d.url, prompt_of(context, salt), 120, rid, on_token)
    mover.join()
    assert moved == [[rid]], moved
    # the longest pause after the move was asked for: the move's own
    after = [b - a for a, b in zip(times, times[1:], strict=False) if b >= moved_at[0]]
    return max(after) * 1000


def gaps(a: argparse.Namespace) -> None:
    d = Deployment(Path(tempfile.mkdtemp(prefix="segue-live-")))
    mocker = [
        "--mocker-step-ms",
        "10",
        "--mocker-prefill-tps",
        str(a.prefill_tps),
        "--mocker-kv-bytes-per-token",
        str(a.kv_bytes_per_token),
        "--mocker-prefix-caching",
        "false",  # a recompute must not find the context cached
    ]
    try:
        d.start_frontend()
        d.start_worker(*mocker, fast=False)
        d.start_worker(*mocker, fast=False)
        for context in (int(c) for c in a.contexts.split(",")):
            row: dict = {
                "context_tokens": context,
                "kv_mib": context * a.kv_bytes_per_token / 2**20,
            }
            for live in (False, True):
                g = [gap_trial(d, context, live, s) for s in range(a.trials)]
                row["kv_gap_ms" if live else "recompute_gap_ms"] = round(statistics.median(g), 1)
            print(json.dumps(row), flush=True)
    finally:
        d.stop()
        shutil.rmtree(d.tmp, ignore_errors=True)


def rolling(a: argparse.Namespace) -> None:
    """Restart every worker one by one under load; live moves (drain deadline 0: everything
    moves with its KV at once) against drain-then-hand-back (drain deadline 30 s)."""
    for mode, drain in (("live", "0"), ("drain", "30")):
        rolling_run(a, mode, drain)


def rolling_run(a: argparse.Namespace, mode: str, drain: str) -> None:
    d = Deployment(Path(tempfile.mkdtemp(prefix="segue-rolling-")))
    mocker = ["--mocker-step-ms", "10", "--drain-timeout", drain]
    try:
        d.start_frontend()
        for _ in range(a.workers):
            d.start_worker(*mocker, fast=False)
        prompt = prompt_of(500, 1)
        want, _ = stream(d.url, prompt, a.max_tokens, "golden")
        stop = threading.Event()
        results: list[bool] = []
        errors: list[str] = []

        def client(c: int) -> None:
            i = 0
            while not stop.is_set():
                try:
                    got, _ = stream(d.url, prompt, a.max_tokens, f"{mode}-{c}-{i}")
                    results.append(got == want)
                except Exception as e:  # a client error is what this measures
                    errors.append(repr(e))
                i += 1

        with cf.ThreadPoolExecutor(a.clients) as pool:
            for c in range(a.clients):
                pool.submit(client, c)
            time.sleep(2)  # load running on every worker
            t0 = time.perf_counter()
            for old in list(d.workers):
                d.start_worker(*mocker, fast=False)
                old.signal(signal.SIGTERM)
                old.popen.wait(120)
                d.workers.remove(old)
            restart_s = time.perf_counter() - t0
            stop.set()
        print(
            json.dumps(
                {
                    "mode": mode,
                    "workers": a.workers,
                    "clients": a.clients,
                    "rolling_restart_s": round(restart_s, 2),
                    "requests": len(results),
                    "exact": sum(results),
                    "client_errors": len(errors),
                }
            ),
            flush=True,
        )
    finally:
        d.stop()
        shutil.rmtree(d.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="1000,4000,16000")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--prefill-tps", type=float, default=5000.0)
    ap.add_argument("--kv-bytes-per-token", type=int, default=1024)
    ap.add_argument("--rolling", action="store_true")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=400)
    a = ap.parse_args()
    if a.rolling:
        rolling(a)
    else:
        gaps(a)


if __name__ == "__main__":
    main()
