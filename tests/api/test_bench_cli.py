"""`segue bench` against a real frontend and worker: its levels split over client
processes (`--processes`) are counted whole, every request answered."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import Deployment, get_json, scrape


def test_bench_over_two_client_processes_counts_every_request(tmp_path):
    d = Deployment(tmp_path)
    try:
        d.start_frontend()
        d.start_worker()
        out = subprocess.run(
            [sys.executable, "-m", "segue", "bench", "--url", d.url, "--json", "--no-progress",
             "--concurrency", "5", "--processes", "2", "--duration", "1", "--warmup", "0.2",
             "--max-tokens", "4", "--ignore-eos"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        [level] = json.loads(out.stdout)
        assert level["concurrency"] == 5 and level["errors"] == 0
        assert level["requests"] > 5 and level["sse_events_per_req"] >= 1
        # four tokens a request, whichever process counted it
        tokens = level["output_tokens_per_s"] * level["duration_s"]
        assert abs(tokens - 4 * level["requests"]) <= 0.01 * tokens + 1
        # both processes' measured requests: all the frontend served but the warm-up's
        served = scrape(d.url)['segue_frontend_requests_total{endpoint="completions",status="200"}']
        assert 0.6 * served <= level["requests"] <= served
        assert get_json(d.url + "/health")["status"] == "ok"
    finally:
        d.stop()
