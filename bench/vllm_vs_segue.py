"""The same vLLM engine behind segue and behind vLLM's own OpenAI server, same model and
load (segue bench, closed loop, streaming completions, ignore_eos).

    python bench/vllm_vs_segue.py --concurrency 1,8 --duration 10

Builds a tiny fp32 Llama (segue make-model) unless --model is given. Prints one JSON line
per (server, concurrency) and the segue/vLLM ratio of output tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Deployment  # noqa: E402


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def stop_group(pgid: int) -> None:
    """vLLM's engine processes outlive its server for a while: make sure none is left to
    compete with the next measurement."""
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def bench(url: str, model: str, a) -> list[dict]:
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
            a.concurrency,
            "--duration",
            str(a.duration),
            "--prompt-tokens",
            str(a.prompt_tokens),
            "--max-tokens",
            str(a.max_tokens),
            "--ignore-eos",
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def run_vllm(model: str, name: str, a, tmp: Path, env: dict) -> list[dict]:
    log = open(tmp / "vllm.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            name,
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "8",
            "--enforce-eager",
            "--port",
            str(a.port),
        ],
        stdout=log,
        stderr=log,
        env=env,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{a.port}/v1/models")
        return bench(f"http://127.0.0.1:{a.port}", name, a)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        stop_group(server.pid)


def run_segue(model: str, name: str, a, tmp: Path) -> list[dict]:
    (tmp / "segue").mkdir(exist_ok=True)
    d = Deployment(tmp / "segue")
    try:
        d.start_frontend("--model", model)
        w = d.start_worker(
            "--engine", "vllm", "--model", model, fast=False, wait=False, ready_timeout=300
        )
        d.wait_routable(w, timeout=300)
        return bench(d.url, name, a)
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8792)
    ap.add_argument("--order", default="vllm,segue", help="which servers, in which order")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="vLLM's engine threads on the last core, everything else (servers, "
        "segue processes, the load generator) on the others",
    )
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="segue-vllm-bench-"))
    model = a.model
    if model is None:
        from segue.models.tiny import build_tiny_llama

        model = str(build_tiny_llama(tmp / "tiny", hidden_size=128, heads=2))
    name = Path(model).name
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if a.pin:
        # On 2 cores vLLM's OpenMP threads otherwise share cores with the serving processes,
        # and a spinning OpenMP thread that loses its core stalls every step.
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[-1])
        os.sched_setaffinity(0, cores[:-1])  # inherited by every process started from here
    results = {}
    for which in a.order.split(","):
        if which == "vllm":
            results["vllm"] = run_vllm(model, name, a, tmp, env)
        else:
            results["segue"] = run_segue(model, name, a, tmp)
    for server_name, rows in results.items():
        for r in rows:
            print(
                json.dumps(
                    {
                        "server": server_name,
                        **{
                            k: r[k]
                            for k in (
                                "concurrency",
                                "requests",
                                "errors",
                                "output_tokens_per_s",
                                "ttft_ms_p50",
                                "itl_ms_p50",
                                "latency_ms_p50",
                            )
                        },
                    }
                )
            )
    if len(results) == 2:
        for v, s in zip(results["vllm"], results["segue"], strict=True):
            print(
                json.dumps(
                    {
                        "concurrency": v["concurrency"],
                        "segue_over_vllm_tokens_per_s": round(
                            s["output_tokens_per_s"] / v["output_tokens_per_s"], 3
                        ),
                    }
                )
            )


if __name__ == "__main__":
    main()
