"""`segue frontend --processes N`: N frontend processes accept on one listening socket (made
here, inherited by each), so one port uses N cores; each routes on its own, and /metrics from
any of them sums all (frontend/metrics.py). This parent only supervises: it restarts a child
that dies, and SIGTERM/SIGINT stops them all gracefully."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import FrameType

from segue.frontend.config import FrontendConfig
from segue.frontend.metrics import MULTIPROC_ENV
from segue.lifetime import die_with_parent
from segue.options import to_argv


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def run_frontend_processes(cfg: FrontendConfig) -> int:
    sock = _listen(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="segue-metrics-")
    child_cfg = dataclasses.replace(cfg, processes=1, port=port, listen_fd=sock.fileno())
    argv = [sys.executable, "-m", "segue", "frontend", *to_argv(child_cfg)]
    env = {**os.environ, MULTIPROC_ENV: metrics_dir}
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, pass_fds=(sock.fileno(),), env=env, preexec_fn=die_with_parent
        )

    def on_hangup(signum: int, frame: FrameType | None) -> None:
        for c in children:  # each process reloads its API keys
            if c.poll() is None:
                c.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGHUP, on_hangup)
    children += [spawn() for _ in range(cfg.processes)]
    url = f"http://{cfg.host}:{port}"
    ready = False
    try:
        while not stopping:
            for i, c in enumerate(children):
                if c.poll() is not None:
                    from prometheus_client.multiprocess import mark_process_dead

                    mark_process_dead(c.pid, metrics_dir)
                    children[i] = spawn()
            if not ready:
                try:
                    with urllib.request.urlopen(url + "/live", timeout=1):
                        ready = True
                    print(f"segue frontend ready url={url} processes={cfg.processes}", flush=True)
                except OSError:
                    pass
            time.sleep(0.1)
    finally:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + cfg.shutdown_grace + 5
        for c in children:
            try:
                c.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
