"""Real processes for tests: `segue frontend` / `segue worker` started through the CLI on
dynamic ports, their logs captured to files, stopped by process group."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from segue.promtext import read_samples

T = TypeVar("T")
READY_RE = re.compile(r"segue (?:worker|frontend) ready .*?url=(\S+)")
FAST_MOCKER = ["--mocker-step-ms", "2", "--mocker-prefill-tps", "1000000"]
_started: list[subprocess.Popen] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test aborted inside its teardown (pytest-timeout) never stops its processes:
    kill every process group this run started before the interpreter goes."""
    for p in _started:  # the group outlives its leader: vLLM engines, killed workers
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...; utime and
    stime at 11 and 12), or None for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> set[int]:
    """PIDs whose parent is `pid` (from /proc)."""
    return {
        int(d)
        for d in os.listdir("/proc")
        if d.isdigit() and (fields := proc_stat(int(d))) and int(fields[1]) == pid
    }


def wait_until(
    cond: Callable[[], T], timeout: float = 30.0, interval: float = 0.01, what: str = "condition"
) -> T:
    """Poll `cond` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a started process inherits: not the Triton interpreter the tests may run in."""
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(extra or {})}


class Proc:
    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict | None = None,
        netns: str | None = None,
    ):
        self.name = name
        self.args = args
        self.netns = netns  # the network namespace (a simulated host) it runs in
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # `ip netns exec` execs the command: the PID is segue's own
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "segue", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(env),
        )
        self.pid = self.popen.pid
        _started.append(self.popen)
        self.url = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> str:
        def ready():
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited early:\n{self.log()}")
            m = READY_RE.search(self.log())
            return m.group(1) if m else None

        self.url = wait_until(ready, timeout, what=f"{self.name} ready line")
        return self.url

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        wait_until(lambda: text in self.log(), timeout, what=f"{text!r} in {self.name} log")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # Whatever is left of the group (an engine's helper processes outliving a killed
        # worker, or a worker that ignored SIGTERM) goes now.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def metrics(self) -> dict[str, float]:
        return scrape(self.url)

    def health(self) -> dict:
        return get_json(self.url + "/health")


def get_json(url: str) -> dict:
    """GET a JSON body, whatever the status (a 503 /health still says which workers).
    Plain urllib, so benchmarks that use this harness need no test extras."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples as {'name{label="v"}': value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return read_samples(r.read().decode())


class Deployment:
    """A discovery directory, a frontend and workers, all real processes."""

    def __init__(self, tmp: Path, discovery: str | None = None) -> None:
        self.tmp = tmp
        self.discovery = discovery or f"file:{tmp / 'discovery'}"
        self.procs: list[Proc] = []
        self.frontend: Proc | None = None
        self.frontends: list[Proc] = []
        self.workers: list[Proc] = []
        self._n = 0

    def start_frontend(
        self, *extra: str, env: dict | None = None, netns: str | None = None
    ) -> Proc:
        """Starts a frontend; the newest is `self.frontend` (earlier ones stay in
        `self.frontends`)."""
        name = "frontend" if not self.frontends else f"frontend{len(self.frontends) + 1}"
        p = Proc(
            name,
            # one response store per deployment, in its directory (shared by its frontends)
            ["frontend", "--port", "0", "--discovery", self.discovery, *self._store(extra), *extra],
            self.tmp,
            env,
            netns,
        )
        self.procs.append(p)
        p.wait_ready()
        self.frontend = p
        self.frontends.append(p)
        return p

    def _store(self, extra: tuple[str, ...]) -> list[str]:
        return [] if "--store" in extra else ["--store", f"sqlite:{self.tmp / 'responses.db'}"]

    def start_worker(
        self,
        *extra: str,
        role: str = "aggregated",
        wait: bool = True,
        fast: bool = True,
        ready_timeout: float = 20.0,
        env: dict | None = None,
        netns: str | None = None,
    ) -> Proc:
        self._n += 1
        args = [
            "worker",
            "--discovery",
            self.discovery,
            "--role",
            role,
            *(FAST_MOCKER if fast else []),
            *extra,
        ]
        p = Proc(f"worker{self._n}-{role}", args, self.tmp, env, netns)
        self.procs.append(p)
        self.workers.append(p)
        p.wait_ready(ready_timeout)
        if wait:
            for fe in self.frontends:
                self.wait_routable(p, frontend=fe)
        return p

    def wait_routable(
        self, worker: Proc, timeout: float = 30.0, frontend: Proc | None = None
    ) -> None:
        fe = frontend or self.frontend

        def seen():
            h = get_json(fe.url + "/health")
            return any(w["url"] == worker.url and w["routable"] for w in h["workers"])

        wait_until(seen, timeout, what=f"{worker.name} routable in the frontend")

    @property
    def url(self) -> str:
        return self.frontend.url

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
