"""The `segue` command: serve | frontend | worker | bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from segue.log import setup_logging


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mocker engine")
    g.add_argument("--mocker-max-num-seqs", type=int, default=256)
    g.add_argument("--mocker-kv-blocks", type=int, default=16384)
    g.add_argument("--mocker-block-size", type=int, default=16)
    g.add_argument("--mocker-step-ms", type=float, default=5.0,
                   help="decode step time for one sequence, before --mocker-speedup")
    g.add_argument("--mocker-prefill-tps", type=float, default=50000.0,
                   help="prefill speed in prompt tokens per second, before --mocker-speedup")
    g.add_argument("--mocker-speedup", type=float, default=1.0,
                   help="divide every simulated time by this (large = near-instant)")
    g.add_argument("--mocker-seed", type=int, default=0)
    g.add_argument("--mocker-kv-bytes-per-token", type=int, default=1024,
                   help="size of the simulated KV payload a prefill hands over")


def _add_real_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hf and vllm engines")
    g.add_argument("--max-num-seqs", type=int, default=8)
    g.add_argument("--kv-blocks", type=int, default=4096)
    g.add_argument("--device", default="auto", help="cpu, cuda or auto")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vllm: tokens one engine step may compute; a longer prompt is "
                        "prefilled in chunks (vLLM's default when unset)")
    g.add_argument("--vllm-kv-connector", default="example", choices=["example", "nixl"],
                   help="vLLM's KV connector for prefill/decode workers (nixl: see the "
                        "README for its state on CPU)")


def _add_frontend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", default="round-robin",
                   choices=["round-robin", "random", "least-loaded"])
    p.add_argument("--migration-limit", type=int, default=3)
    p.add_argument("--stall-timeout", type=float, default=5.0,
                   help="seconds without any frame from a worker before it counts as hung")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="default per-request deadline in seconds (none by default)")
    p.add_argument("--model-name", default=None, help="served model name")
    p.add_argument("--disagg-strategy", default="none",
                   choices=["none", "frontend", "decode-first", "prefill-first"])
    p.add_argument("--prefill-fallback", default="none", choices=["none", "local"],
                   help="with no prefill worker left, prefill on the decode worker")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segue", description=__doc__)
    ap.add_argument("--log-level", default=os.environ.get("SEGUE_LOG_LEVEL", "INFO"))
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="frontend + N workers as child processes")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--engine", default="mocker", choices=["mocker", "hf", "vllm"])
    s.add_argument("--model", default=None, help="Hugging Face model directory")
    _add_frontend_flags(s)
    _add_engine_flags(s)
    _add_real_engine_flags(s)

    f = sub.add_parser("frontend", help="the OpenAI HTTP frontend")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=8000)
    f.add_argument("--discovery", required=True, help="file:DIR")
    f.add_argument("--namespace", default="default")
    f.add_argument("--model", default=None, help="Hugging Face model directory (tokenizer)")
    _add_frontend_flags(f)

    w = sub.add_parser("worker", help="one engine worker")
    w.add_argument("--engine", default="mocker", choices=["mocker", "hf", "vllm"])
    w.add_argument("--model", default=None)
    w.add_argument("--role", default="aggregated", choices=["aggregated", "prefill", "decode"])
    w.add_argument("--discovery", required=True)
    w.add_argument("--namespace", default="default")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=0)
    w.add_argument("--drain-timeout", type=float, default=30.0)
    w.add_argument("--keepalive", type=float, default=0.5,
                   help="seconds between keep-alive frames while a request makes no tokens")
    w.add_argument("--lease-ttl", type=float, default=10.0,
                   help="seconds a worker stays listed after its last lease renewal (a dead "
                        "local process is dropped at once; a failed call takes a worker out "
                        "of rotation at once)")
    _add_real_engine_flags(w)
    w.add_argument("--stall-timeout", type=float, default=5.0,
                   help="seconds without a frame from a remote stage before it counts as hung")
    w.add_argument("--kv-ttl", type=float, default=30.0,
                   help="seconds a prefilled KV payload waits for its pull before it is freed")
    w.add_argument("--prefill-fallback", default="none", choices=["none", "local"],
                   help="decode worker: prefill locally when no prefill worker is left")
    w.add_argument("--engine-stall-timeout", type=float, default=120.0,
                   help="seconds the engine may make no progress at all (no token, no "
                        "finish) while it holds requests before the worker declares it hung: "
                        "the requests fail over, the worker leaves discovery and exits 3 "
                        "(0: never)")
    w.add_argument("--fault-exit-after-tokens", type=int, default=None, help=argparse.SUPPRESS)
    w.add_argument("--fault-engine-hang-after-tokens", type=int, default=None,
                   help=argparse.SUPPRESS)
    _add_engine_flags(w)

    m = sub.add_parser("make-model", help="build a tiny random-weight Llama model directory")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--vocab-size", type=int, default=1024)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4,
                   help="attention heads (vLLM on CPU wants hidden/heads = 64: e.g. 128 and 2)")

    b = sub.add_parser("bench", help="closed-loop load generator for any OpenAI endpoint")
    from segue.bench import add_bench_args

    add_bench_args(b)
    return ap


def _model_name(args) -> str:
    if args.model_name:
        return args.model_name
    return os.path.basename(os.path.normpath(args.model)) if args.model else "segue-mocker"


async def _frontend(args) -> None:
    from segue.discovery import open_discovery
    from segue.frontend.server import FrontendConfig, run_frontend
    from segue.tokenizer import load_tokenizer
    from segue.worker.server import install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(stop)
    cfg = FrontendConfig(
        host=args.host, port=args.port, model_name=_model_name(args), router=args.router,
        migration_limit=args.migration_limit, stall_timeout=args.stall_timeout,
        request_timeout=args.request_timeout, disagg_strategy=args.disagg_strategy,
        prefill_fallback=args.prefill_fallback,
    )
    tok = load_tokenizer(args.model)
    await run_frontend(cfg, tok, open_discovery(args.discovery, args.namespace), stop)


async def _worker(args) -> int:
    from segue.discovery import open_discovery
    from segue.engines import create_engine
    from segue.tokenizer import load_tokenizer
    from segue.worker.server import Worker, WorkerConfig, install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(stop)
    tok = load_tokenizer(args.model)
    engine = create_engine(args.engine, args, tok)
    cfg = WorkerConfig(
        role=args.role, host=args.host, port=args.port, lease_ttl=args.lease_ttl,
        keepalive_s=args.keepalive, drain_timeout=args.drain_timeout,
        stall_timeout=args.stall_timeout, kv_ttl=args.kv_ttl,
        prefill_fallback=args.prefill_fallback, exit_after_tokens=args.fault_exit_after_tokens,
        engine_stall_timeout=args.engine_stall_timeout,
    )
    return await Worker(engine, open_discovery(args.discovery, args.namespace), cfg).run(stop)


def _run(coro) -> None:
    import uvloop

    code = uvloop.run(coro)
    if code:
        # os._exit: a failed engine may hold threads or processes a normal exit would
        # wait for (a hung forward pass, vLLM's finalizers).
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.cmd == "make-model":
        from segue.models.tiny import build_tiny_llama

        path = build_tiny_llama(args.dir, seed=args.seed, vocab_size=args.vocab_size,
                                hidden_size=args.hidden_size, layers=args.layers,
                                heads=args.heads)
        print(f"tiny model written to {path}")
        return
    if args.cmd == "bench":
        from segue.bench import run_bench

        sys.exit(run_bench(args))
    setup_logging(args.cmd, args.log_level.upper())
    if args.cmd == "serve":
        from segue.serve import serve

        sys.exit(serve(args))
    _run(_frontend(args) if args.cmd == "frontend" else _worker(args))


if __name__ == "__main__":
    main()
