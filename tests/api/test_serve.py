"""`segue serve`: one command starts a frontend and two workers, replaces a worker that
dies, and SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
from harness import children, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_starts_frontend_and_two_workers_and_stops_them(tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen(
        [sys.executable, "-m", "segue", "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: f"segue ready: http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text(),
            30,
            what="ready line",
        )
        h = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert len(h["workers"]) == 2
        kids = children(p.pid)
        assert len(kids) == 3
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "segue-mocker", "prompt": "hi", "max_tokens": 3},
        )
        assert r.status_code == 200
        # a worker that dies (a crash, or exit 3 after its engine failed) is replaced
        dead = h["workers"][0]["pid"]
        os.kill(dead, signal.SIGKILL)

        def replaced():
            pids = [
                w["pid"] for w in httpx.get(f"http://127.0.0.1:{port}/health").json()["workers"]
            ]
            return len(pids) == 2 and dead not in pids

        wait_until(replaced, 30, what="the killed worker replaced")
        kids = children(p.pid)
        assert len(kids) == 3 and dead not in kids
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        for k in kids:
            assert (
                not os.path.exists(f"/proc/{k}")
                or open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
            )
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        log.close()
