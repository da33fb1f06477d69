"""Time from a client's disconnect (TCP RST) to the engine abort that frees its KV blocks,
in each phase: waiting in the engine queue, during prefill, mid-decode.

The worker logs `Aborted Request ID: <id> (t=<epoch>)` right after the engine freed the
request's blocks; the client notes the epoch just before it closes the socket. Both are
wall-clock times on one machine.

    python bench/cancel_latency.py --trials 20
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from client import RawRequest, body  # noqa: E402
from harness import Deployment, scrape, wait_until  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    a = ap.parse_args()
    d = Deployment(Path(tempfile.mkdtemp(prefix="segue-cancel-")))
    try:
        d.start_frontend()
        w = d.start_worker(
            "--mocker-max-num-seqs",
            "1",
            "--mocker-prefill-tps",
            "200",
            "--mocker-step-ms",
            "5",
            fast=False,
        )
        out = {}

        def m() -> dict[str, float]:
            return scrape(w.url)

        for phase in ("queued", "prefill", "decode"):
            lat = []
            for i in range(a.trials):
                rid = f"{phase}-{i}"
                blocker = None
                if phase == "queued":
                    blocker = RawRequest(
                        d.url, "completions", body("completions", "x", 30000, True), rid + "-b"
                    )
                    blocker.read_events(1)
                prompt = " ".join(["the"] * 400) if phase == "prefill" else "a story"
                req = RawRequest(d.url, "completions", body("completions", prompt, 5000, True), rid)
                w.wait_log(f"New Request ID: {rid}")
                if phase == "queued":
                    wait_until(lambda: m()["segue_engine_waiting_requests"] == 1)
                elif phase == "prefill":
                    wait_until(lambda: m()["segue_engine_running_requests"] == 1)
                else:
                    req.read_events(5)
                t0 = time.time()
                req.close()
                pat = re.compile(rf"Aborted Request ID: {re.escape(rid)} \(t=([\d.]+)\)")
                t1 = float(wait_until(lambda p=pat: p.search(w.log()), 5).group(1))
                lat.append((t1 - t0) * 1000)
                if blocker is not None:
                    blocker.close()
                wait_until(lambda: m()["segue_engine_kv_blocks_used"] == 0)
            lat.sort()
            out[phase] = {
                "p50_ms": round(statistics.median(lat), 3),
                "p90_ms": round(lat[int(0.9 * len(lat))], 3),
                "max_ms": round(lat[-1], 3),
            }
        print(json.dumps({"disconnect_to_abort_and_kv_freed": out, "trials": a.trials}))
    finally:
        d.stop()
        shutil.rmtree(d.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
