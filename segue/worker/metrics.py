"""The worker's Prometheus metrics (names are a contract: docs/contracts.md). Engine gauges
are read from the engine's stats at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

from segue.engines.base import Engine


class _PromptTokensCollector:
    """segue_engine_prompt_tokens_total{source}: where the engine got each prompt token's KV
    (computed here, its own prefix cache, or loaded from another worker), as the engine
    counts it; engines that do not count report nothing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        c = CounterMetricFamily(
            "segue_engine_prompt_tokens",
            "Prompt tokens by where their KV came from",
            labels=["source"],
        )
        for source, n in self.engine.stats().prompt_tokens.items():
            c.add_metric([source], n)
        yield c


def _stat_reader(engine: Engine, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(engine.stats(), attr))


class WorkerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("segue_worker_requests", "Engine requests started", registry=r)
        self.aborts = Counter(
            "segue_worker_aborts",
            "Engine requests aborted because the caller went away",
            registry=r,
        )
        self.detached = Counter(
            "segue_worker_detached",
            "Requests kept running after their caller's connection broke (--detach-grace)",
            registry=r,
        )
        self.attached = Counter(
            "segue_worker_attached",
            "Detached requests a new caller attached to",
            registry=r,
        )
        self.remote_aborts = Counter(
            "segue_worker_remote_aborts",
            "Remote stages cancelled because the caller went away",
            registry=r,
        )
        self.rejections = Counter(
            "segue_worker_rejections",
            "Calls refused at the admission limit (--max-pending)",
            registry=r,
        )
        self.live_moves = Counter(
            "segue_worker_live_moves",
            "Requests given back with the KV of their context (live moves)",
            registry=r,
        )
        self.output_tokens = Counter(
            "segue_worker_output_tokens", "Tokens sent to callers", registry=r
        )
        for name, doc, attr in (
            ("segue_engine_running_requests", "Requests running in the engine", "running"),
            ("segue_engine_waiting_requests", "Requests waiting in the engine", "waiting"),
            ("segue_engine_kv_blocks_used", "KV cache blocks in use", "kv_blocks_used"),
            ("segue_engine_kv_blocks_total", "KV cache blocks in the pool", "kv_blocks_total"),
        ):
            Gauge(name, doc, registry=r).set_function(_stat_reader(engine, attr))
        r.register(_PromptTokensCollector(engine))
        Gauge(
            "segue_engine_healthy", "1 while the engine is healthy, 0 once it failed", registry=r
        ).set_function(lambda: float(engine.healthy))
