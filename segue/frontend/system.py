"""Probes on a port of their own, answered by a thread with its own event loop.

Under a burst the frontend's event loop has thousands of callbacks ready and a probe on the
serving port waits its turn behind them (hundreds of ms); an orchestrator would then restart
a frontend that is only busy. `--system-port` serves /live, /health and /metrics from a
thread instead: /health is the latest snapshot the main loop published (it republishes every
`PUBLISH_S`), /metrics is the Prometheus registry (thread-safe), and /live checks the main
loop itself: it is 503 when the loop has not published for `stall_s` seconds (a hung or
starved loop, which the serving port's /live could not report at all).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

log = logging.getLogger("segue.system")

PUBLISH_S = 0.25


@dataclass(frozen=True, slots=True)
class Snapshot:
    health: bytes  # /health's JSON body
    healthy: bool
    at: float  # time.monotonic() of publication


class SystemServer:
    def __init__(
        self, host: str, port: int, metrics: Callable[[], bytes], stall_s: float = 5.0
    ) -> None:
        self.host, self.port, self.stall_s = host, port, stall_s
        self._metrics = metrics
        self.snapshot = Snapshot(b"{}", False, time.monotonic())  # replaced whole: atomic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="system-port", daemon=True)
        self.bound: int | None = None
        self.error: BaseException | None = None

    def start(self) -> int:
        """Binds and serves in the thread; returns the bound port."""
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error
        assert self.bound is not None
        return self.bound

    def publish(self, health: bytes, healthy: bool) -> None:
        self.snapshot = Snapshot(health, healthy, time.monotonic())

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = web.Application()
        app.router.add_get("/live", self._live)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_handler)
        runner = web.AppRunner(app, access_log=None)
        try:
            await runner.setup()
            # reuse_port: with --processes every process binds it; the kernel spreads probes
            site = web.TCPSite(runner, self.host, self.port, reuse_port=True)
            await site.start()
            self.bound = runner.addresses[0][1]
        except BaseException as e:  # bind failed: start() raises it in the caller
            self.error = e
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        await self._stopped.wait()
        await runner.cleanup()

    def _stale_for(self) -> float:
        return time.monotonic() - self.snapshot.at

    async def _live(self, request: web.Request) -> web.Response:
        stale = self._stale_for()
        if stale > self.stall_s:
            body = {"status": "stalled", "event_loop_stalled_s": round(stale, 1)}
            return web.json_response(body, status=503)
        return web.json_response({"status": "live"})

    async def _health(self, request: web.Request) -> web.Response:
        snap = self.snapshot
        ok = snap.healthy and self._stale_for() <= self.stall_s
        return web.Response(
            body=snap.health, status=200 if ok else 503, content_type="application/json"
        )

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics(), content_type="text/plain")
