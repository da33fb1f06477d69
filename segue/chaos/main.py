"""The `segue chaos` command: its options (flags, a TOML file), the deployment it starts or
targets, the run, the verdict and the report; the exit code says which."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

from segue.chaos import report
from segue.chaos.config import (
    CHAOS_SKIP_FRONTEND,
    CHAOS_SKIP_WORKER,
    ChaosConfig,
    toml_defaults,
    validate,
)
from segue.chaos.deployment import (
    Deployment,
    DeploymentError,
    LocalDeployment,
    TargetDeployment,
)
from segue.chaos.result import judge_all
from segue.chaos.run import chaos
from segue.chaos.summary import render_text, summarize
from segue.frontend.config import FrontendConfig
from segue.frontend.keys import read_keys
from segue.options import from_args
from segue.worker.config import WorkerConfig

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEPLOYMENT = 0, 1, 2, 3


def parse_config(args: argparse.Namespace) -> tuple[ChaosConfig, FrontendConfig, WorkerConfig]:
    return (
        from_args(ChaosConfig, args),
        from_args(FrontendConfig, args, CHAOS_SKIP_FRONTEND),
        from_args(WorkerConfig, args, CHAOS_SKIP_WORKER),
    )


def load_config(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    reparse: Callable[[], argparse.Namespace],
) -> tuple[ChaosConfig, FrontendConfig, WorkerConfig]:
    """The run's configs from the parsed flags; a TOML file's options become the chaos
    parser's defaults and the command line is parsed again, so flags given on it win.
    A bad option exits with a usage error naming it."""
    if args.config:
        try:
            parser.set_defaults(**toml_defaults(args.config, parser))
        except (OSError, ValueError) as e:
            parser.error(str(e))
        args = reparse()
    cfg, fe_cfg, wk_cfg = parse_config(args)
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg, fe_cfg, wk_cfg


def run_chaos(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    reparse: Callable[[], argparse.Namespace],
) -> int:
    cfg, fe_cfg, wk_cfg = load_config(args, parser, reparse)
    try:
        import matplotlib  # noqa: F401 - the report's plots; found missing now, not after the run
    except ImportError:
        parser.error("the report needs matplotlib: pip install 'segue[chaos]'")
    # The frontend's --api-key-file (of the deployment started, or targeted): its first
    # key is the one the run's clients send.
    api_key = None
    if fe_cfg.api_key_file:
        try:
            api_key = next(iter(read_keys(Path(fe_cfg.api_key_file))), None)
        except OSError as e:
            parser.error(f"--api-key-file: {e}")
        if api_key is None:
            parser.error(f"--api-key-file: no key in {fe_cfg.api_key_file}")
    report_dir = Path(cfg.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    dep: Deployment
    if cfg.url:
        dep = TargetDeployment(cfg.url)
    else:
        (report_dir / "logs").mkdir(exist_ok=True)
        try:
            dep = LocalDeployment(
                cfg.workers,
                fe_cfg,
                wk_cfg,
                report_dir / "logs",
                cfg.netns,
                cfg.restart,
                cfg.frontends,
                cfg.etcd_members(),
            )
        except RuntimeError as e:  # network namespaces refused (not root)
            print(f"segue chaos: {e}", file=sys.stderr)
            return EXIT_DEPLOYMENT
    try:
        if isinstance(dep, LocalDeployment):
            dep.start()
        result = asyncio.run(chaos(cfg, dep, api_key))
    except DeploymentError as e:
        print(f"segue chaos: deployment failed: {e}", file=sys.stderr)
        return EXIT_DEPLOYMENT
    except KeyboardInterrupt:
        return EXIT_FAILED
    finally:
        dep.close()
    judge_all(result)
    summary = summarize(cfg, result)
    report.write(report_dir, cfg, result, summary)
    print(render_text(summary, report_dir))
    return EXIT_OK if summary.passed else EXIT_FAILED
