"""Faults and their bookkeeping: which worker each strikes, when it ends (a stopped process
continued, a cut link healed), when the deployment was whole again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Callable

import msgspec

from segue.chaos.config import ETCD_FAULTS, RESTARTING, FaultKind
from segue.chaos.deployment import Deployment, children, descendants


class WorkerView(msgspec.Struct):
    """A worker as the frontend's /health lists it."""

    id: str
    pid: int
    url: str
    routable: bool
    role: str = "aggregated"


class FaultEvent(msgspec.Struct):
    t: float  # seconds since the run's start
    kind: FaultKind
    target: str = ""  # worker id, or "clients"
    pid: int | None = None
    slot: int | None = None
    detail: str = ""
    ends: float | None = None  # when a stop, partition or slow link ends
    recovered: float | None = None  # the worker (or its replacement) routable again
    skipped: str = ""  # why it struck nothing

    @property
    def recoverable(self) -> bool:
        """A fault whose end is watched for: one that struck a process or etcd."""
        return not self.skipped and (self.pid is not None or self.kind in ETCD_FAULTS)

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered is None else self.recovered - self.t


def _signal_tree(pid: int, sig: int) -> None:
    """`sig` to a worker and everything under it (vLLM's engine core and its helpers)."""
    for p in (pid, *descendants(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


class Injector:
    def __init__(
        self,
        dep: Deployment,
        hang_s: float,
        min_routable: int,
        seed: int,
        disconnect: Callable[[random.Random], int],
        frontend_killed: Callable[[str], None] = lambda url: None,
    ) -> None:
        self.dep = dep
        self.frontend_killed = frontend_killed
        self.hang_s = hang_s
        self.min_routable = min_routable
        self.rng = random.Random(seed + 1)
        self.disconnect = disconnect
        self.events: list[FaultEvent] = []
        self._pending: dict[int, tuple[asyncio.TimerHandle, Callable[[], None]]] = {}
        self._stopped: set[int] = set()
        self._role_turn = 0

    def targets(self, workers: list[WorkerView]) -> list[WorkerView]:
        """Workers a fault may strike: routable, on this machine, not already struck."""
        return [
            w
            for w in workers
            if w.routable and w.pid not in self._stopped and self.dep.can_signal(w.pid)
        ]

    def strike(self, kind: FaultKind, now: float, workers: list[WorkerView]) -> FaultEvent:
        ev = FaultEvent(t=now, kind=kind)
        self.events.append(ev)
        if kind == FaultKind.DISCONNECT:
            n = self.disconnect(self.rng)
            ev.target, ev.detail = "clients", f"{n} streams abandoned"
            ev.skipped = "" if n else "no stream in flight"
            return ev
        if kind == FaultKind.FRONTEND_KILL:
            return self._kill_frontend(ev)
        if kind in ETCD_FAULTS:
            return self._strike_etcd(ev, kind)
        candidates = self.targets(workers)
        if kind == FaultKind.ENGINE_KILL:
            candidates = [w for w in candidates if children(w.pid)]
            if not candidates:
                ev.skipped = "no worker with engine processes (the mocker and hf run inside it)"
                return ev
        if not candidates:
            ev.skipped = "no routable worker this run may signal"
            return ev
        # A fault takes the struck worker's whole process (a host of a simulated fleet);
        # at least --min-routable workers of each role must stay.
        candidates = [w for w in candidates if self._leaves_enough(w, workers)]
        if not candidates:
            ev.skipped = f"would leave fewer than {self.min_routable} routable workers of a role"
            return ev
        roles = sorted({w.role for w in candidates})
        if len(roles) > 1:  # disaggregated: prefill and decode workers struck by turns
            role = roles[self._role_turn % len(roles)]
            self._role_turn += 1
            candidates = [w for w in candidates if w.role == role]
        w = self.rng.choice(candidates)
        ev.target, ev.pid, ev.slot = w.id, w.pid, self.dep.slot_of(w.pid)
        loop = asyncio.get_running_loop()
        if kind == FaultKind.KILL:
            os.kill(w.pid, signal.SIGKILL)
        elif kind == FaultKind.TERM:
            os.kill(w.pid, signal.SIGTERM)
        elif kind == FaultKind.ENGINE_KILL:
            kids = children(w.pid)
            for p in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            ev.detail = f"engine pids {kids}"
        elif kind == FaultKind.STOP:
            _signal_tree(w.pid, signal.SIGSTOP)
            self._stopped.add(w.pid)
            self._later(loop, lambda pid=w.pid: self._cont(pid))  # type: ignore[misc]
        elif kind in (FaultKind.PARTITION, FaultKind.SLOW):
            host = self.dep.host_of(w.pid)
            if host is None:
                ev.skipped = "the worker is not on a simulated host"
                return ev
            self._stopped.add(w.pid)
            if kind == FaultKind.PARTITION:
                host.partition()
                heal = host.heal
            else:
                ev.detail = host.slow_link(200, 5.0)
                heal = host.fast_link
            self._later(loop, lambda pid=w.pid, h=heal: self._heal(pid, h))  # type: ignore[misc]
        if kind not in RESTARTING:
            ev.ends = now + self.hang_s
        return ev

    def _leaves_enough(self, w: WorkerView, workers: list[WorkerView]) -> bool:
        left = sum(1 for o in workers if o.routable and o.role == w.role and o.pid != w.pid)
        return left >= self.min_routable

    def _strike_etcd(self, ev: FaultEvent, kind: FaultKind) -> FaultEvent:
        etcd = self.dep.etcd
        if etcd is None:
            ev.skipped = "no etcd started by this run"
            return ev
        loop = asyncio.get_running_loop()
        if any(not m.running or m.stopped for m in etcd.members):
            ev.skipped = "etcd not whole yet"
            return ev
        if kind == FaultKind.ETCD_STOP:
            for m in etcd.members:
                m.signal(signal.SIGSTOP)
            ev.target, ev.detail = "etcd", f"{len(etcd.members)} members stopped"

            def cont() -> None:
                for m in etcd.members:
                    m.signal(signal.SIGCONT)

            self._later(loop, cont)
        else:
            # by turns the leader and a follower
            lead = etcd.leader()
            n = len(etcd.members)
            kills = sum(e.kind == FaultKind.ETCD_KILL and not e.skipped for e in self.events)
            if lead is None:
                i, role = self.rng.randrange(n), "a member (no leader seen)"
            elif kills % 2 == 1:  # this event is already in self.events
                i, role = lead, "the leader"
            else:
                i, role = (lead + 1 + self.rng.randrange(n - 1)) % n, "a follower"
            m = etcd.members[i]
            ev.target, ev.detail = f"etcd{i}", role
            ev.pid = m.proc.pid if m.proc else None
            m.kill()
            self._later(loop, lambda i=i: etcd.restart(i, wait=False))  # type: ignore[misc]
        ev.ends = ev.t + self.hang_s
        return ev

    def _kill_frontend(self, ev: FaultEvent) -> FaultEvent:
        """SIGKILLs one of the serving frontends, never the last."""
        serving = [f for f in self.dep.frontends if f.url and f.popen and f.popen.poll() is None]
        if len(serving) < 2:
            ev.skipped = "fewer than two frontends serving"
            return ev
        f = self.rng.choice(serving)
        assert f.pid is not None
        ev.target, ev.pid, ev.detail = f"frontend{f.index}", f.pid, f.url
        os.kill(f.pid, signal.SIGKILL)
        self.frontend_killed(f.url)
        return ev

    def _later(self, loop: asyncio.AbstractEventLoop, undo: Callable[[], None]) -> None:
        key = len(self.events) - 1  # the event being struck

        def fire() -> None:
            self._pending.pop(key, None)
            undo()

        self._pending[key] = (loop.call_later(self.hang_s, fire), undo)

    def _cont(self, pid: int) -> None:
        self._stopped.discard(pid)
        _signal_tree(pid, signal.SIGCONT)

    def _heal(self, pid: int, heal: Callable[[], object]) -> None:
        self._stopped.discard(pid)
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            heal()

    def end_all(self, now: float) -> None:
        """Ends every fault still in force (the run is over or stopping)."""
        for key, (handle, undo) in self._pending.items():
            handle.cancel()
            undo()
            ev = self.events[key]
            ev.ends = min(ev.ends or now, now)
        self._pending.clear()

    def note_health(self, now: float, workers: list[WorkerView]) -> None:
        """Marks faults recovered: the struck worker's place has a routable worker again
        after the fault ended (its replacement, for faults that end a process)."""
        routable = {w.pid for w in workers if w.routable}
        for ev in self.events:
            if ev.recovered is not None or not ev.recoverable:
                continue
            if ev.ends is not None and now < ev.ends:
                continue
            if ev.kind in ETCD_FAULTS:  # every member back and answering
                etcd = self.dep.etcd
                ok = etcd is not None and all(
                    m.running and not m.stopped and m.healthy() for m in etcd.members
                )
            elif ev.kind == FaultKind.FRONTEND_KILL:  # its place serves again, a new process
                ok = any(f.pid != ev.pid and f.url and ev.pid in f.pids for f in self.dep.frontends)
            elif ev.kind in RESTARTING:
                if ev.slot is not None:
                    slot = self.dep.slots[ev.slot]
                    ok = slot.pid != ev.pid and slot.pid in routable
                else:  # someone else's supervisor: back to as many routable workers
                    ok = len(routable) >= self.dep.expected_workers
            else:
                ok = ev.pid in routable
            if ok:
                ev.recovered = now
