"""The `segue` command: serve | frontend | worker | bench | chaos | make-model.

The flags of `frontend` and `worker` are generated from their config dataclasses
(segue/frontend/config.py, segue/worker/config.py); `serve` takes both sets and passes each
process its own (segue/serve.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from segue import tracing
from segue.engines.config import EngineName
from segue.frontend.config import FrontendConfig
from segue.log import LogFormat, setup_logging
from segue.options import add_flags, from_args
from segue.serve import SERVE_SKIP_FRONTEND, SERVE_SKIP_WORKER, ServeConfig
from segue.worker.config import WorkerConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="segue", description=__doc__)
    ap.add_argument("--log-level", default=os.environ.get("SEGUE_LOG_LEVEL", "INFO"))
    # also after a process's subcommand (`segue frontend --log-format json`)
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument(
        "--log-format",
        choices=[f.value for f in LogFormat],
        default=argparse.SUPPRESS,
        help="text lines, or one JSON object per line (default: $SEGUE_LOG_FORMAT or text)",
    )
    ap.add_argument("--log-format", choices=[f.value for f in LogFormat], default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="frontend + N workers as child processes", parents=[logs])
    add_flags(s, ServeConfig)
    add_flags(s, FrontendConfig, skip=SERVE_SKIP_FRONTEND)
    add_flags(s, WorkerConfig, skip=SERVE_SKIP_WORKER)

    fe = sub.add_parser("frontend", help="the OpenAI HTTP frontend", parents=[logs])
    add_flags(fe, FrontendConfig)
    add_flags(sub.add_parser("worker", help="one engine worker", parents=[logs]), WorkerConfig)

    m = sub.add_parser("make-model", help="build a tiny random-weight Llama model directory")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--vocab-size", type=int, default=1024)
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument(
        "--heads",
        type=int,
        default=4,
        help="attention heads (vLLM on CPU wants hidden/heads = 64: e.g. 128 and 2)",
    )
    m.add_argument(
        "--kv-heads", type=int, default=None, help="key/value heads (GQA); default --heads"
    )
    m.add_argument(
        "--intermediate-size", type=int, default=None, help="MLP width; default 2x --hidden-size"
    )
    m.add_argument(
        "--context-length", type=int, default=2048, help="positions the model and tokenizer take"
    )

    a = sub.add_parser("worker-admin", help="operator calls to one worker (move requests)")
    from segue.admin import add_admin_args

    add_admin_args(a)

    c = sub.add_parser(
        "chaos", help="load + faults on a deployment; every answer checked against a fault-free run"
    )
    from segue.chaos.config import add_chaos_args

    add_chaos_args(c)
    ap.set_defaults(chaos_parser=c)

    b = sub.add_parser("bench", help="closed-loop load generator for any OpenAI endpoint")
    from segue.bench import add_bench_args

    add_bench_args(b)
    return ap


async def _frontend(cfg: FrontendConfig) -> int:
    from segue.discovery import open_discovery
    from segue.frontend.server import run_frontend
    from segue.lifetime import install_signal_handlers
    from segue.tokenizer import load_tokenizer

    stop = asyncio.Event()
    install_signal_handlers(stop)
    tok = load_tokenizer(cfg.model)
    tracing.setup(cfg.otlp_traces_endpoint, "segue-frontend")
    try:
        await run_frontend(cfg, tok, open_discovery(cfg.discovery, cfg.namespace), stop)
    finally:
        await asyncio.to_thread(tracing.shutdown)
    return 0


async def _worker(cfg: WorkerConfig) -> int:
    from segue.discovery import open_discovery
    from segue.engines.registry import create_engine
    from segue.lifetime import install_signal_handlers
    from segue.models.card import card_for
    from segue.tokenizer import load_tokenizer
    from segue.worker.lifecycle import Worker

    stop = asyncio.Event()
    install_signal_handlers(stop)
    tok = load_tokenizer(cfg.model)
    card = card_for(tok, cfg.served_model_name, cfg.model)
    disc = open_discovery(cfg.discovery, cfg.namespace)
    tracing.setup(cfg.otlp_traces_endpoint, "segue-worker")
    try:
        if cfg.replicas > 1:
            from segue.worker.fleet import run_fleet

            engines = [create_engine(cfg, tok) for _ in range(cfg.replicas)]
            return await run_fleet(engines, disc, cfg, card, stop)
        return await Worker(create_engine(cfg, tok), disc, cfg, card).run(stop)
    finally:
        await asyncio.to_thread(tracing.shutdown)


def _run(coro: Coroutine[Any, Any, int]) -> None:
    import uvloop

    code = uvloop.run(coro)
    if code:
        # os._exit: a failed engine may hold threads or processes a normal exit would
        # wait for (a hung forward pass, vLLM's finalizers).
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "make-model":
        from segue.models.tiny import build_tiny_llama

        path = build_tiny_llama(
            args.dir,
            seed=args.seed,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate_size=args.intermediate_size,
            max_positions=args.context_length,
        )
        print(f"tiny model written to {path}")
        return
    if args.cmd == "bench":
        from segue.bench import run_bench

        sys.exit(run_bench(args))
    if args.cmd == "chaos":
        from segue.chaos.main import run_chaos

        sys.exit(run_chaos(args, args.chaos_parser, lambda: ap.parse_args(argv)))
    if args.cmd == "worker-admin":
        from segue.admin import run_admin

        sys.exit(run_admin(args))
    fmt = args.log_format
    setup_logging(args.cmd, args.log_level.upper(), LogFormat(fmt) if fmt else None)
    if args.cmd == "serve":
        from segue.serve import serve

        sys.exit(
            serve(
                from_args(ServeConfig, args),
                from_args(FrontendConfig, args, SERVE_SKIP_FRONTEND),
                from_args(WorkerConfig, args, SERVE_SKIP_WORKER),
            )
        )
    if args.cmd == "frontend":
        cfg = from_args(FrontendConfig, args)
        if cfg.processes > 1:
            from segue.frontend.processes import run_frontend_processes

            sys.exit(run_frontend_processes(cfg))
        _run(_frontend(cfg))
    else:
        wcfg = from_args(WorkerConfig, args)
        if wcfg.replicas < 1 or (wcfg.replicas > 1 and wcfg.engine is not EngineName.MOCKER):
            ap.error("--replicas: at least 1, and more than 1 only with --engine mocker")
        _run(_worker(wcfg))


if __name__ == "__main__":
    main()
