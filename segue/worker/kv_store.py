"""KV that waits on a worker for another worker to pull it: a finished prefill's (for a
decode worker), or a live-moved request's (for the worker that goes on with it).

Each entry is an engine key whose blocks stay allocated until the payload is pulled (then
freed: it now lives on the other worker), dropped because its request was cancelled, or
expired after a TTL because nobody came for it.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from segue.engines.base import Engine
from segue.protocol import KvHandle, token_digest

log = logging.getLogger("segue.worker")


class KvStore:
    def __init__(self, engine: Engine, ttl: float, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.ttl = ttl
        self.url = ""  # this worker's, once it listens
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.empty = asyncio.Event()  # nothing waits for a pull
        self.empty.set()
        g = Gauge(
            "segue_worker_kv_handles_held",
            "Prefilled KV payloads awaiting a pull",
            registry=registry,
        )
        g.set_function(lambda: len(self._timers))
        self.expired = Counter(
            "segue_worker_kv_expired", "KV payloads freed unpulled at TTL", registry=registry
        )
        self.transferred = Counter(
            "segue_worker_kv_transferred_bytes",
            "KV payload bytes pulled by decode workers",
            registry=registry,
        )

    def put(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(self.ttl, self._expire, key)
        self.empty.clear()

    def publish(self, key: str, token_ids: list[int]) -> KvHandle:
        """Keeps the engine's KV `key` (of `token_ids`) for pulling and describes it."""
        self.put(key)
        return KvHandle(
            url=self.url,
            kv_id=key,
            num_tokens=len(token_ids),
            digest=token_digest(token_ids),
            nbytes=self.engine.kv_nbytes(key),
        )

    def _gone(self, key: str) -> asyncio.TimerHandle | None:
        timer = self._timers.pop(key, None)
        if not self._timers:
            self.empty.set()
        return timer

    def take(self, key: str) -> bytes | None:
        """The payload, once; its blocks are freed here."""
        timer = self._gone(key)
        if timer is None:
            return None
        timer.cancel()
        payload = self.engine.kv_payload(key)
        self.engine.release_kv(key)
        self.transferred.inc(len(payload))
        return payload

    def drop(self, key: str, why: str) -> bool:
        timer = self._gone(key)
        if timer is None:
            return False
        timer.cancel()
        self.engine.release_kv(key)
        log.info("freed KV %s (%s)", key, why)
        return True

    def _expire(self, key: str) -> None:
        if self._gone(key) is not None:
            self.engine.release_kv(key)
            self.expired.inc()
            log.warning("KV %s expired after %.1fs without a pull: freed", key, self.ttl)

    def clear(self) -> None:
        for key in list(self._timers):
            self.drop(key, "shutdown")
