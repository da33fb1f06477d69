"""`segue serve`: a frontend and N workers as child processes on one machine.

Children run in their own process groups and get SIGKILL from the kernel if this
supervisor dies (PR_SET_PDEATHSIG), so nothing is orphaned. SIGTERM/SIGINT stops them all
gracefully; a worker that crashes is restarted.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from segue.lifetime import die_with_parent

log = logging.getLogger("segue.serve")


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "segue", *args], preexec_fn=die_with_parent,
        start_new_session=True,
    )


def _passthrough(args, prefix: str) -> list[str]:
    out = []
    for key, val in vars(args).items():
        if key.startswith(prefix) and val is not None:
            out += ["--" + key.replace("_", "-"), str(val)]
    return out


def _stop(procs: list[subprocess.Popen], timeout: float = 40.0) -> None:
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


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL whatever is left in a child's process group (an engine's helper processes
    can outlive a worker that crashed), then reap the child."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def serve(args) -> int:
    disc_dir = tempfile.mkdtemp(prefix="segue-discovery-")
    disc = f"file:{disc_dir}"
    model = ["--model", args.model] if args.model else []
    worker_args = ["worker", "--engine", args.engine, "--discovery", disc, *model,
                   *_passthrough(args, "mocker_"), "--max-num-seqs", str(args.max_num_seqs),
                   "--kv-blocks", str(args.kv_blocks), "--device", args.device]
    fe_args = ["frontend", "--host", args.host, "--port", str(args.port), "--discovery", disc,
               "--router", args.router, "--migration-limit", str(args.migration_limit),
               "--stall-timeout", str(args.stall_timeout), *model]
    if args.model_name:
        fe_args += ["--model-name", args.model_name]
    if args.request_timeout:
        fe_args += ["--request-timeout", str(args.request_timeout)]

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = [_spawn(worker_args) for _ in range(args.workers)]
    frontend = _spawn(fe_args)
    url = f"http://{args.host}:{args.port}"
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
                if h and sum(1 for w in h["workers"] if w["routable"]) >= args.workers:
                    ready = True
                    print(f"segue ready: {url} (frontend pid {frontend.pid}, "
                          f"{args.workers} {args.engine} workers)", flush=True)
            time.sleep(0.1)
    finally:
        _stop([frontend, *workers])
    return code
