"""Disaggregated vs aggregated serving on the mocker, KV transfer speed, and
cancel-to-freed time on both workers of a disaggregated request.

    python bench/disagg.py --duration 8

1. Same load (segue bench, closed loop) against 2 aggregated workers and against
   1 prefill + 1 decode worker for each strategy: TTFT and output tokens/s.
2. KV transfer: a prefill through the request plane, then the timed pull of its payload
   (the mocker's KV is `--mocker-kv-bytes-per-token` bytes per token), in ms per MiB.
3. Cancel-to-freed: decode-first, client RST during the remote prefill and during decode;
   times from the disconnect to each worker's abort log line (logged after the engine
   freed the request's blocks).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from client import RawRequest, body  # noqa: E402
from harness import Deployment, scrape, wait_until  # noqa: E402

from segue.protocol import EngineRequest, FrameParser, Phase, encode_request  # noqa: E402

MOCKER = ("--mocker-step-ms", "5", "--mocker-prefill-tps", "20000")


def deployment(strategy: str) -> Deployment:
    d = Deployment(Path(tempfile.mkdtemp(prefix=f"segue-disagg-{strategy}-")))
    d.start_frontend("--disagg-strategy", strategy)
    roles = ["aggregated", "aggregated"] if strategy == "none" else ["prefill", "decode"]
    for r in roles:
        d.start_worker(*MOCKER, role=r, fast=False)
    for w in d.workers:  # peers see each other
        wait_until(lambda w=w: strategy == "none" or "joined (" in w.log())
    return d


def load(d: Deployment, a) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segue",
            "bench",
            "--url",
            d.url,
            "--concurrency",
            str(a.concurrency),
            "--duration",
            str(a.duration),
            "--prompt-tokens",
            str(a.prompt_tokens),
            "--max-tokens",
            str(a.max_tokens),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    r = json.loads(out)[0]
    return {
        k: r[k]
        for k in (
            "requests_per_s",
            "output_tokens_per_s",
            "ttft_ms_p50",
            "ttft_ms_p99",
            "itl_ms_p50",
            "errors",
        )
    }


def kv_transfer(d: Deployment, tokens: int) -> dict:
    p = next(w for w in d.workers if "prefill" in w.name)
    times = []
    for i in range(5):
        req = EngineRequest(
            request_id=f"kv-{tokens}-{i}",
            token_ids=list(range(4, tokens + 4)),
            max_tokens=1,
            phase=Phase.PREFILL,
        )
        post = urllib.request.Request(p.url + "/generate", encode_request(req))
        with urllib.request.urlopen(post, timeout=60) as r:
            kv = FrameParser().feed(r.read())[-1].kv
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{kv.url}/kv/{kv.kv_id}", timeout=60) as r:
            data = r.read()
        times.append(time.perf_counter() - t0)
    mib = len(data) / 2**20
    return {
        "payload_mib": round(mib, 2),
        "pull_ms_p50": round(statistics.median(times) * 1e3, 2),
        "ms_per_mib": round(statistics.median(times) * 1e3 / mib, 2),
    }


def abort_time(w, rid: str, remote: bool = False) -> float:
    kind = "Aborted Remote Request ID" if remote else "Aborted Request ID"
    pat = re.compile(rf"{kind}: {re.escape(rid)} .*?t=([\d.]+)\)")
    return float(wait_until(lambda: pat.search(w.log()), 5).group(1))


def cancel_to_freed(a) -> dict:
    d = Deployment(Path(tempfile.mkdtemp(prefix="segue-disagg-cancel-")))
    try:
        d.start_frontend("--disagg-strategy", "decode-first")
        p = d.start_worker("--mocker-prefill-tps", "200", role="prefill", fast=False)
        dw = d.start_worker("--mocker-step-ms", "5", role="decode", fast=False)
        wait_until(lambda: "joined (" in dw.log())
        res: dict[str, list[float]] = {
            "prefill_phase_prefill_worker_ms": [],
            "prefill_phase_decode_worker_ms": [],
            "decode_phase_decode_worker_ms": [],
        }
        for i in range(a.trials):
            rid = f"cp-{i}"
            req = RawRequest(
                d.url, "completions", body("completions", " ".join(["the"] * 400), 50, True), rid
            )
            wait_until(lambda: scrape(p.url)["segue_engine_running_requests"] == 1)
            t0 = time.time()
            req.close()
            res["prefill_phase_prefill_worker_ms"].append((abort_time(p, rid) - t0) * 1e3)
            res["prefill_phase_decode_worker_ms"].append(
                (abort_time(dw, rid, remote=True) - t0) * 1e3
            )
            rid = f"cd-{i}"
            req = RawRequest(d.url, "completions", body("completions", "a story", 5000, True), rid)
            req.read_events(5)
            t0 = time.time()
            req.close()
            res["decode_phase_decode_worker_ms"].append((abort_time(dw, rid) - t0) * 1e3)
            for w in (p, dw):
                wait_until(lambda w=w: scrape(w.url)["segue_engine_kv_blocks_used"] == 0)
        return {
            k: {"p50": round(statistics.median(v), 3), "max": round(max(v), 3)}
            for k, v in res.items()
        }
    finally:
        d.stop()
        shutil.rmtree(d.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--trials", type=int, default=10)
    a = ap.parse_args()
    for strategy in ("none", "frontend", "decode-first", "prefill-first"):
        d = deployment(strategy)
        try:
            print(json.dumps({"strategy": strategy, **load(d, a)}), flush=True)
            if strategy == "frontend":
                for tokens in (1000, 8000):
                    print(
                        json.dumps({"kv_transfer_tokens": tokens, **kv_transfer(d, tokens)}),
                        flush=True,
                    )
        finally:
            d.stop()
            shutil.rmtree(d.tmp, ignore_errors=True)
    print(json.dumps({"cancel_to_freed_ms": cancel_to_freed(a)}))


if __name__ == "__main__":
    main()
