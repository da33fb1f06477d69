"""The engine monitor: notices an engine that failed for good, and stops the worker.

Dead: the engine reports itself unhealthy (e.g. vLLM's engine core is gone); its requests
end with retryable errors on their own. Hung: a live engine holds requests and has produced
nothing at all for --engine-stall-timeout, while this process keeps every caller's stall
timer quiet with keep-alives; its requests are failed here. Either way the requests migrate,
and the worker leaves discovery and exits with ENGINE_FAILED_EXIT: neither state recovers,
and an exit lets a supervisor restart it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from segue.engines.base import Engine
from segue.worker.session import EngineFailure, EngineSessions

log = logging.getLogger("segue.worker")


def check_engine(
    engine: Engine, sessions: EngineSessions, stall_limit: float, now: float
) -> str | None:
    """One look at the engine: why it failed (and `sessions.failure` set), or None."""
    idle_for = now - sessions.progress
    if not engine.healthy:
        sessions.failure = EngineFailure.DEAD
        return "engine died"
    if stall_limit > 0 and sessions.active and idle_for > stall_limit:
        sessions.failure = EngineFailure.HUNG
        why = f"engine made no progress for {idle_for:.1f}s"
        sessions.fail_all(why)
        return why
    return None


async def monitor_engines(
    watched: list[tuple[Engine, EngineSessions, asyncio.Event]], stall_limit: float
) -> None:
    """Checks each (engine, sessions, stop) a few times a second until its engine fails;
    then sets its `stop`. One task for every worker of a process: a fleet of idle replicas
    wakes four times a second, not four times a second each."""
    watched = list(watched)
    while watched:
        await asyncio.sleep(min(0.25, stall_limit / 4) if stall_limit > 0 else 0.25)
        now = time.monotonic()
        for item in list(watched):
            engine, sessions, stop = item
            if stop.is_set():  # stopping anyway
                watched.remove(item)
                continue
            why = check_engine(engine, sessions, stall_limit, now)
            if why is None:
                continue
            log.error(
                "%s with %d requests: failing them over, leaving discovery, exiting",
                why,
                len(sessions.active),
            )
            stop.set()
            watched.remove(item)
