"""The stall timer on a clock the test moves: a silent peer is found; a freeze of the
calling process is forgiven once, not taken for a stall of every open call."""

from __future__ import annotations

from typing import Any

from segue.transport import FROZEN_S, StallTimer


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Any) -> Any:
        self.timers.append((when, cb))
        return self

    def cancel(self) -> None:  # the handle call_at returns
        pass

    def run_until(self, t: float) -> None:
        """Advance the clock to `t`, running timers that fall due on the way."""
        while self.timers and min(w for w, _ in self.timers) <= t:
            self.timers.sort(key=lambda x: x[0])
            when, cb = self.timers.pop(0)
            self.now = max(self.now, when)
            cb()
        self.now = t

    def run_late(self, t: float) -> None:
        """A frozen process: the clock jumps to `t`, then the due timers run, late."""
        self.now = t
        due = [x for x in self.timers if x[0] <= t]
        self.timers = [x for x in self.timers if x[0] > t]
        for _, cb in due:
            cb()


class FakeTask:
    cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


def make(timeout: float = 5.0) -> tuple[FakeLoop, FakeTask, StallTimer]:
    loop, task = FakeLoop(), FakeTask()
    return loop, task, StallTimer(timeout, loop=loop, task=task)  # type: ignore[arg-type]


def test_fires_after_timeout_of_silence():
    loop, task, timer = make()
    timer.arm()
    loop.run_until(4.9)
    assert task.cancelled == 0
    loop.run_until(5.01)
    assert task.cancelled == 1 and timer.fired


def test_bytes_from_the_peer_restart_the_window():
    loop, task, timer = make()
    for t in (3.0, 6.0, 9.0, 12.0):
        timer.arm()
        loop.run_until(t)
        timer.disarm()  # a chunk arrived
    timer.arm()
    loop.run_until(16.9)
    assert task.cancelled == 0
    loop.run_until(17.1)
    assert task.cancelled == 1


def test_never_fires_while_disarmed():
    loop, task, timer = make()
    timer.disarm()  # our own caller is busy, not the peer
    loop.run_until(60.0)
    assert task.cancelled == 0


def test_a_frozen_process_is_forgiven_once():
    loop, task, timer = make()
    timer.arm()
    loop.run_late(30.0)  # this process was stopped for 30 s: the check runs 25 s late
    assert 30.0 - 5.0 > FROZEN_S
    assert task.cancelled == 0  # the peer may have sent while we were frozen
    loop.run_until(34.9)
    assert task.cancelled == 0
    loop.run_until(35.1)  # a full window after the freeze, still silent: a stall
    assert task.cancelled == 1


def test_every_check_late_still_finds_a_hung_peer():
    loop, task, timer = make()
    timer.arm()
    t = 0.0
    for _ in range(5):  # an overloaded loop: every check runs late
        t = max(w for w, _ in loop.timers) + FROZEN_S + 0.5
        loop.run_late(t)
        if task.cancelled:
            break
    assert task.cancelled == 1
