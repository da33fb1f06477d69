"""The frontend's Prometheus metrics (names are a contract: docs/contracts.md).

With several frontend processes on one port (`--processes N`) every process writes its
samples to files in $PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and any
of them answers /metrics with the sum over all: one view, whichever process a scrape hits.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from segue.failures import ACTIONS, Verdict

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "segue_frontend_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.migrations = Counter(
            "segue_frontend_migrations",
            "Requests re-sent to another worker",
            ["reason"],
            registry=r,
        )
        self.kv_move_fallbacks = Counter(
            "segue_frontend_kv_move_fallbacks",
            "Live moves whose KV could not be used: the next worker recomputed",
            ["reason"],
            registry=r,
        )
        self.rejections = Counter(
            "segue_frontend_rejections",
            "Requests refused for load: overloaded (429), max_inflight (503)",
            ["reason"],
            registry=r,
        )
        self.cancellations = Counter(
            "segue_frontend_cancellations",
            "Requests cancelled because the client went away",
            registry=r,
        )
        self.response_resumes = Counter(
            "segue_frontend_response_resumes",
            "Streams of a stored response resumed (GET /v1/responses/ID?stream=true)",
            registry=r,
        )
        self.response_takeovers = Counter(
            "segue_frontend_response_takeovers",
            "Background responses this process took over from a frontend that stopped "
            "writing them (died, or let them go at shutdown)",
            registry=r,
        )
        self.response_detaches = Counter(
            "segue_frontend_response_detaches",
            "Background responses this process let go at its drain deadline, their "
            "generation left running on its worker for another frontend to attach to",
            registry=r,
        )
        self.store_errors = Counter(
            "segue_frontend_store_errors",
            "Response store operations that failed",
            registry=r,
        )
        self.routable_workers = Gauge(
            "segue_frontend_routable_workers",
            "Workers this frontend can route to (in discovery and in rotation), by model and role",
            ["model", "role"],
            registry=r,
            multiprocess_mode="max",
        )
        self.inflight = Gauge(
            "segue_frontend_inflight_requests",
            "Requests in flight",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "segue_frontend_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.itl = Histogram(
            "segue_frontend_inter_token_latency_seconds",
            "Time between consecutive token deliveries to the client",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        # every reason at 0 from the start: a rate() over them, and the alerts on them,
        # see a series before the first migration or rejection
        for reason, action in ACTIONS.items():
            if action.verdict is Verdict.RETRY:
                self.migrations.labels(reason=reason.value)
        for refusal in ("overloaded", "max_inflight"):
            self.rejections.labels(reason=refusal)

    def exposition(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


class Tally:
    """Observations of one histogram gathered here and added to it in one go (every
    `every` observations and at `flush`): a stream's inter-token latencies cost a bisect
    each instead of a histogram observation (two locked increments, a file write with
    several processes) per token. Adds through the histogram's own bucket values
    (prometheus-client 0.26: non-cumulative, one per bound, then the sum)."""

    __slots__ = ("_hist", "_bounds", "_counts", "_sum", "_n", "_every")

    def __init__(self, hist: Histogram, every: int = 256) -> None:
        self._hist = hist
        self._bounds = list(hist._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._n = 0
        self._every = every

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value
        self._n += 1
        if self._n >= self._every:
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        buckets = self._hist._buckets
        for i, c in enumerate(self._counts):
            if c:
                buckets[i].inc(c)
                self._counts[i] = 0
        self._hist._sum.inc(self._sum)
        self._sum, self._n = 0.0, 0
