"""`segue worker --replicas N`: N mocker workers in one process, a simulated fleet on one
machine. Each replica is a whole `Worker` to everything outside (its own id, etcd lease,
model card, listening port, request plane and engine); they share the process's discovery
client and one engine monitor, so an idle replica costs a lease renewal every ttl/3 and
nothing else. A SIGTERM drains them all; a replica whose engine fails leaves discovery on
its own while the others serve on, and the process exits ENGINE_FAILED_EXIT once all have
stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from segue.discovery import Discovery, ModelCard
from segue.engines.base import Engine
from segue.log import fields as log_fields
from segue.worker.config import WorkerConfig
from segue.worker.lifecycle import ENGINE_FAILED_EXIT, Worker
from segue.worker.monitor import monitor_engines

log = logging.getLogger("segue.worker")


async def run_fleet(
    engines: list[Engine],
    discovery: Discovery,
    cfg: WorkerConfig,
    card: ModelCard,
    stop: asyncio.Event,
) -> int:
    """Serves one worker per engine until `stop`; returns the process's exit code."""
    workers = [Worker(e, discovery, cfg, card, owns_discovery=False) for e in engines]
    process = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    log_fields.worker_id = f"fleet-{os.getpid()}"  # the lines of many workers
    stops = [asyncio.Event() for _ in workers]

    async def relay() -> None:
        await stop.wait()
        for s in stops:
            s.set()

    watched = [(w.engine, w.sessions, s) for w, s in zip(workers, stops, strict=True)]
    helpers = [
        asyncio.create_task(relay()),
        asyncio.create_task(monitor_engines(watched, cfg.engine_stall_timeout)),
    ]
    try:
        runs = [w.run(s, True, process) for w, s in zip(workers, stops, strict=True)]
        codes = await asyncio.gather(*runs)
    finally:
        for t in helpers:
            t.cancel()
        await discovery.close()
    failed = sum(1 for c in codes if c)
    log.info("fleet of %d workers stopped (%d engines failed)", len(workers), failed)
    return ENGINE_FAILED_EXIT if failed else 0
