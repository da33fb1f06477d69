"""Prefilled KV that waits on a prefill worker for a decode worker to pull it.

Each entry is an engine key whose blocks stay allocated until the payload is pulled (then
freed: it now lives on the decode worker), dropped because its request was cancelled, or
expired after a TTL because nobody came for it.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge

from segue.engines.base import Engine

log = logging.getLogger("segue.worker")


class KvStore:
    def __init__(self, engine: Engine, ttl: float, registry: CollectorRegistry) -> None:
        self.engine = engine
        self.ttl = ttl
        self._timers: dict[str, asyncio.TimerHandle] = {}
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

    def take(self, key: str) -> bytes | None:
        """The payload, once; its blocks are freed here."""
        timer = self._timers.pop(key, None)
        if timer is None:
            return None
        timer.cancel()
        payload = self.engine.kv_payload(key)
        self.engine.release_kv(key)
        self.transferred.inc(len(payload))
        return payload

    def drop(self, key: str, why: str) -> bool:
        timer = self._timers.pop(key, None)
        if timer is None:
            return False
        timer.cancel()
        self.engine.release_kv(key)
        log.info("freed KV %s (%s)", key, why)
        return True

    def _expire(self, key: str) -> None:
        if self._timers.pop(key, None) is not None:
            self.engine.release_kv(key)
            self.expired.inc()
            log.warning("KV %s expired after %.1fs without a pull: freed", key, self.ttl)

    def clear(self) -> None:
        for key in list(self._timers):
            self.drop(key, "shutdown")
