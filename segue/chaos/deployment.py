"""The deployment a chaos run strikes: one it starts (a frontend and workers as child
processes, each worker optionally on a simulated host of its own, exited workers restarted as
a supervisor would) or a running one it targets by its frontend's URL (its workers listed by
the frontend's /health; those whose processes run on this machine can be signalled)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from segue.chaos.config import CHAOS_SKIP_FRONTEND, CHAOS_SKIP_WORKER
from segue.disagg import Strategy
from segue.etcd_cluster import Etcd
from segue.frontend.config import FrontendConfig
from segue.lifetime import die_with_parent
from segue.netsim import Host, Net
from segue.options import to_argv
from segue.protocol import Role
from segue.worker.config import WorkerConfig

_READY_RE = re.compile(rb"segue frontend ready url=(\S+)")


class DeploymentError(RuntimeError):
    """The deployment could not be started or reached."""


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def descendants(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def is_local_worker(pid: int) -> bool:
    """A `segue worker` process on this machine (a PID the frontend reports may belong to
    another machine, or to something else here)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"segue" in b" ".join(argv) and b"worker" in argv


@dataclass
class Slot:
    """One worker place of a started deployment; its process changes on restart."""

    index: int
    host: Host | None
    role: Role = Role.AGGREGATED
    popen: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)  # every process it has had

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None


@dataclass
class FrontendSlot:
    """One frontend place of a started deployment; its process changes on restart."""

    index: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    url: str = ""  # once its process is ready
    restarts: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def poll_ready(self) -> bool:
        """Reads its ready line (its log is appended to by each process in turn)."""
        if not self.url and self.popen is not None:
            found = _READY_RE.findall(self.log_path.read_bytes())
            if len(found) > self.restarts:
                self.url = found[-1].decode()
        return bool(self.url)


class Deployment:
    """What the run needs of a deployment, whoever started it."""

    url: str = ""  # a frontend that serves (the first one ready)
    frontend_pid: int | None = None
    slots: list[Slot]
    frontends: list[FrontendSlot]
    expected_workers: int = 0
    replicas: int = 1  # workers per worker process (`segue worker --replicas`)
    etcd: Etcd | None = None  # the etcd cluster the run started, if any

    def urls(self) -> list[str]:
        """Every frontend serving now, for the clients to spread over."""
        return [self.url]

    def whole(self) -> bool:
        return True

    def supervise(self) -> list[tuple[int, int]]:
        """Restarts exited workers; returns (slot, new pid) for each."""
        return []

    def slot_of(self, pid: int) -> int | None:
        for s in self.slots:
            if pid in s.pids:
                return s.index
        return None

    def host_of(self, pid: int) -> Host | None:
        i = self.slot_of(pid)
        return self.slots[i].host if i is not None else None

    def can_signal(self, pid: int) -> bool:
        return is_local_worker(pid)

    def close(self) -> None:
        pass


class TargetDeployment(Deployment):
    """A running deployment: the operator's supervisor restarts what the faults kill."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.slots = []
        self.frontends = []
        self.expected_workers = 0  # as many as are routable when the run starts


class LocalDeployment(Deployment):
    def __init__(
        self,
        workers: int,
        frontend: FrontendConfig,
        worker: WorkerConfig,
        log_dir: Path,
        netns: bool = False,
        restart: bool = True,
        frontends: int = 1,
        etcd_members: int = 0,
    ) -> None:
        self.replicas = worker.replicas
        self.expected_workers = workers * worker.replicas
        self.restart = restart
        self.log_dir = log_dir
        self.disc = tempfile.mkdtemp(prefix="segue-chaos-discovery-")
        self.net = Net() if netns else None
        # Disaggregated: the first half of the workers prefill, the rest decode.
        disagg = frontend.disagg_strategy is not Strategy.NONE
        roles = [
            (Role.PREFILL if i < workers // 2 else Role.DECODE) if disagg else Role.AGGREGATED
            for i in range(workers)
        ]
        self.slots = [
            Slot(i, self.net.host(f"w{i}") if self.net else None, roles[i]) for i in range(workers)
        ]
        d = f"file:{self.disc}"
        if etcd_members:
            try:
                host = self.net.gateway if self.net else "127.0.0.1"
                self.etcd = Etcd(Path(self.disc), etcd_members, host)
            except Exception:
                self._close_net()
                raise
            d = self.etcd.spec
        # every frontend shares the response store (a resumed stream reads it)
        store = [] if frontend.store else ["--store", f"sqlite:{self.disc}/responses.db"]
        self.frontend_argv = [
            "frontend",
            "--discovery",
            d,
            "--port",
            "0",
            *store,
            *to_argv(frontend, CHAOS_SKIP_FRONTEND),
        ]
        self.worker_argv = ["worker", "--discovery", d, *to_argv(worker, CHAOS_SKIP_WORKER)]
        names = ["frontend.log"] + [f"frontend{i}.log" for i in range(1, frontends)]
        self.frontends = [FrontendSlot(i, log_dir / n) for i, n in enumerate(names)]
        self._fe_logs: list[IO[bytes]] = []
        self.restart_times: list[float] = []

    def _spawn(self, argv: list[str], log: IO[bytes], host: Host | None) -> subprocess.Popen[bytes]:
        prefix = ["ip", "netns", "exec", host.name] if host else []
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "segue", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )

    def _start_worker(self, slot: Slot) -> None:
        if slot.log is None:
            slot.log = open(self.log_dir / f"worker{slot.index}.log", "ab")  # noqa: SIM115
        host_args = ["--host", slot.host.addr] if slot.host else []
        argv = [*self.worker_argv, "--role", slot.role.value, *host_args]
        slot.popen = self._spawn(argv, slot.log, slot.host)
        slot.pids.append(slot.popen.pid)

    def _start_frontend(self, f: FrontendSlot) -> None:
        log = open(f.log_path, "ab")  # noqa: SIM115 - closed in close()
        self._fe_logs.append(log)
        f.url = ""
        f.popen = self._spawn(self.frontend_argv, log, None)
        f.pids.append(f.popen.pid)

    def urls(self) -> list[str]:
        return [f.url for f in self.frontends if f.url and f.popen and f.popen.poll() is None]

    def _serving(self) -> None:
        """`url` and `frontend_pid`: the first frontend that serves."""
        serving = [
            f for f in self.frontends if f.poll_ready() and f.popen and f.popen.poll() is None
        ]
        if serving:
            self.url, self.frontend_pid = serving[0].url, serving[0].pid

    def whole(self) -> bool:
        """Every frontend place serves (a killed one's replacement is ready), and every
        etcd member is back and answering."""
        if self.etcd is not None and not all(
            m.running and not m.stopped and m.healthy() for m in self.etcd.members
        ):
            return False
        return len(self.urls()) == len(self.frontends)

    def start(self, timeout: float = 120.0) -> None:
        for s in self.slots:
            self._start_worker(s)
        for f in self.frontends:
            self._start_frontend(f)
        deadline = time.monotonic() + timeout
        for f in self.frontends:
            while not f.poll_ready():
                if f.popen is not None and f.popen.poll() is not None:
                    raise DeploymentError(f"a frontend exited early: see {f.log_path}")
                if time.monotonic() > deadline:
                    raise DeploymentError(f"the frontend was not ready in {timeout:g} s")
                time.sleep(0.05)
        self._serving()
        for s in self.slots:
            if s.popen and s.popen.poll() is not None:
                raise DeploymentError(f"worker {s.index} exited early: see {s.log and s.log.name}")

    def supervise(self) -> list[tuple[int, int]]:
        started = []
        for s in self.slots:
            if s.popen is None or s.popen.poll() is None or not self.restart:
                continue
            _kill_group(s.popen)
            self._start_worker(s)
            s.restarts += 1
            started.append((s.index, s.popen.pid))
        for f in self.frontends:
            if f.popen is not None and f.popen.poll() is not None and self.restart:
                _kill_group(f.popen)
                f.restarts += 1
                self._start_frontend(f)
        self._serving()
        return started

    def close(self) -> None:
        procs = [
            p for p in (*(f.popen for f in self.frontends), *(s.popen for s in self.slots)) if p
        ]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGCONT)  # a stopped worker cannot act on SIGTERM
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
            _kill_group(p)
        for s in self.slots:
            if s.log:
                s.log.close()
        for log in self._fe_logs:
            log.close()
        if self.etcd is not None:
            self.etcd.stop()
        self._close_net()

    def _close_net(self) -> None:
        if self.net:
            self.net.close()
        shutil.rmtree(self.disc, ignore_errors=True)


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of a child's process group (an engine's helpers outlive a
    killed worker), then reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
