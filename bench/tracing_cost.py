"""What OpenTelemetry tracing costs the frontend: CPU per request with tracing off and with
every request traced (`--otlp-traces-endpoint` to a local OTLP sink that accepts and drops
the batches), side by side in one run: two frontends over the same two mocker workers,
driven in alternating rounds by `segue bench` (streaming completions, one SSE event per
token at --step-ms).

    python bench/tracing_cost.py [--rounds 4] [--duration 8] [--concurrency 16]

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, free_port, spawn, stop, wait_workers  # noqa: E402


class Sink(BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them (the receiver's cost is not the point)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def bench(url: str, a: argparse.Namespace) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "segue", "bench", "--url", url, "--json", "--no-progress",
         "--concurrency", str(a.concurrency), "--duration", str(a.duration), "--warmup", "1",
         "--max-tokens", str(a.max_tokens), "--prompt-tokens", "100", "--ignore-eos"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(out.stdout)[0]["requests"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--step-ms", type=float, default=5.0)
    a = p.parse_args()
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    with tempfile.TemporaryDirectory(prefix="segue-bench-") as tmp:
        log = open(Path(tmp) / "procs.log", "w")  # noqa: SIM115 - closed with the dir
        disc = f"file:{tmp}"
        timing = ["--mocker-step-ms", str(a.step_ms), "--mocker-batch-slowdown", "0"]
        procs = [
            spawn(["--log-level", "WARNING", "worker", "--discovery", disc, *timing], log)
            for _ in range(2)
        ]
        frontends = {}
        for name, extra in (("off", []), ("on", ["--otlp-traces-endpoint", endpoint])):
            port = free_port()
            fe = spawn(["--log-level", "WARNING", "frontend", "--discovery", disc,
                        "--port", str(port), *extra], log)  # fmt: skip
            procs.append(fe)
            frontends[name] = (fe, f"http://127.0.0.1:{port}")
        try:
            for _, url in frontends.values():
                wait_workers(url, 2)
            cpu = dict.fromkeys(frontends, 0.0)
            count = dict.fromkeys(frontends, 0)
            for _ in range(a.rounds):
                for name, (fe, url) in frontends.items():
                    before = cpu_seconds(fe.pid)
                    count[name] += bench(url, a)
                    cpu[name] += cpu_seconds(fe.pid) - before
            per = {k: 1000 * cpu[k] / count[k] for k in frontends}
            for k in frontends:
                print(f"tracing {k}: {count[k]} requests, frontend CPU {per[k]:.3f} ms per request")
            print(f"on / off: {per['on'] / per['off']:.3f}")
        finally:
            stop(procs)
            sink.shutdown()


if __name__ == "__main__":
    main()
