"""What a chaos run recorded: every request's outcome (and its reference's), the faults,
the deployment sampled over time, the workers' resources after. The verdict and the report
are made from it (summary.py, report.py)."""

from __future__ import annotations

import msgspec

from segue.chaos.faults import FaultEvent
from segue.chaos.workload import Outcome, judge


class Sample(msgspec.Struct):
    """The deployment at one moment of the run."""

    t: float
    routable: int
    load: dict[str, float]  # worker -> requests running in its engine
    migrations: dict[str, float]  # reason -> count since the faulted phase began
    cancellations: float
    inflight: float
    rss_mib: dict[str, float]  # each frontend process (`frontend0 pid 123`) -> its RSS


class WorkerState(msgspec.Struct):
    """A worker's resources after the run (all zero when idle)."""

    worker: str
    running: int
    waiting: int
    kv_blocks_used: int
    held: int

    def idle(self) -> bool:
        return not (self.running or self.waiting or self.kv_blocks_used or self.held)


class EtcdAfter(msgspec.Struct):
    """The run's etcd after it: a lease per live worker, no more."""

    leases: int
    keys: int  # registered workers


class RunResult(msgspec.Struct):
    reference: list[Outcome]
    outcomes: list[Outcome]
    faults: list[FaultEvent]
    samples: list[Sample]
    workers_after: list[WorkerState]
    frontend_inflight_after: float
    routable_after: int
    metrics_delta: dict[str, float]
    duration_s: float
    restarts: int
    expected_workers: int = 0  # routable after the run (0: whatever a target has)
    etcd_after: EtcdAfter | None = None


def judge_all(result: RunResult) -> None:
    """Each outcome's verdict against its request's reference answer."""
    ref = {o.spec: o for o in result.reference}
    for o in result.outcomes:
        o.verdict = judge(o, ref.get(o.spec))
