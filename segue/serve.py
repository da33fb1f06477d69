"""`segue serve`: a frontend and N workers as child processes on one machine.

Children run in their own process groups and get SIGKILL from the kernel if this
supervisor dies (PR_SET_PDEATHSIG), so nothing is orphaned. SIGTERM/SIGINT stops them all
gracefully; a worker that crashes is restarted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from types import FrameType

from segue import health
from segue.frontend.config import FrontendConfig
from segue.lifetime import die_with_parent
from segue.options import option, to_argv
from segue.worker.config import WorkerConfig

log = logging.getLogger("segue.serve")


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "segue", *args],
        preexec_fn=die_with_parent,
        start_new_session=True,
    )


@dataclass(frozen=True)
class ServeConfig:
    workers: int = option(2, help="worker processes to start")


# `serve` sets these itself: one discovery directory for all, workers on free local ports.
SERVE_SKIP_FRONTEND = frozenset({"discovery", "namespace"})
SERVE_SKIP_WORKER = frozenset({"discovery", "namespace", "host", "port", "role", "replicas"})


def child_argvs(
    frontend: FrontendConfig, worker: WorkerConfig, discovery: str
) -> tuple[list[str], list[str]]:
    """The command lines of the frontend and of each worker."""
    fe = ["frontend", "--discovery", discovery, *to_argv(frontend, SERVE_SKIP_FRONTEND)]
    wk = ["worker", "--discovery", discovery, *to_argv(worker, SERVE_SKIP_WORKER)]
    return fe, wk


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 40.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill_group(p)


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left in a child's process group (an engine's helper processes
    can outlive a worker that crashed), then reap the child."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _health(url: str) -> health.FrontendHealth | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return health.decode_frontend(r.read())
    except OSError:
        return None


def serve(cfg: ServeConfig, frontend: FrontendConfig, worker: WorkerConfig) -> int:
    disc_dir = tempfile.mkdtemp(prefix="segue-discovery-")
    try:
        return _supervise(cfg, frontend, worker, disc_dir)
    finally:
        shutil.rmtree(disc_dir, ignore_errors=True)


def _supervise(
    cfg: ServeConfig, frontend_cfg: FrontendConfig, worker_cfg: WorkerConfig, disc_dir: str
) -> int:
    fe_args, worker_args = child_argvs(frontend_cfg, worker_cfg, f"file:{disc_dir}")
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [_spawn(worker_args) for _ in range(cfg.workers)]
    frontend = _spawn(fe_args)
    url = f"http://{frontend_cfg.host}:{frontend_cfg.port}"
    ready = False
    code = 0
    try:
        while not stopping:
            if frontend.poll() is not None:
                log.error("frontend exited with %s", frontend.returncode)
                code = 1
                break
            for i, w in enumerate(workers):
                if w.poll() is not None:
                    log.warning("worker pid %d exited with %s: restarting", w.pid, w.returncode)
                    _kill_group(w)
                    workers[i] = _spawn(worker_args)
            if not ready:
                h = _health(url)
                if h and len(h.routable) >= cfg.workers:
                    ready = True
                    print(
                        f"segue ready: {url} (frontend pid {frontend.pid}, "
                        f"{cfg.workers} {worker_cfg.engine} workers)",
                        flush=True,
                    )
            time.sleep(0.1)
    finally:
        _stop([frontend, *workers])
    return code
