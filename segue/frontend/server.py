"""One frontend process: the HTTP server around a `Frontend`, on its own port or a socket
its parent made (`--processes N`), the system port, SIGHUP for API keys, and the graceful
stop (no new connections, streams finish)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from segue import health
from segue.discovery import Discovery
from segue.frontend.app import Frontend
from segue.frontend.config import FrontendConfig
from segue.frontend.connections import GuardedRunner
from segue.frontend.system import PUBLISH_S, SystemServer
from segue.lifetime import freeze_startup_objects
from segue.tokenizer import Tokenizer

DETACH_BEFORE_S = 1.0  # background responses are let go this long before the drain deadline

log = logging.getLogger("segue.frontend")


async def run_frontend(
    cfg: FrontendConfig, tokenizer: Tokenizer, discovery: Discovery, stop: asyncio.Event
) -> None:
    fe = Frontend(cfg, tokenizer, discovery)
    runner = GuardedRunner(
        fe.app(),
        cfg.max_client_connections,
        cfg.header_timeout,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=cfg.shutdown_grace,
    )
    await runner.setup()
    fe.guard = runner.guard
    if cfg.listen_fd is not None:  # one of several processes on a socket its parent made
        sock = socket.socket(fileno=cfg.listen_fd)
        await web.SockSite(runner, sock).start()
        port = sock.getsockname()[1]
        print(f"segue frontend process ready pid={os.getpid()}", flush=True)
    else:
        await web.TCPSite(runner, cfg.host, cfg.port, backlog=1024).start()
        port = runner.addresses[0][1]
        print(f"segue frontend ready url=http://{cfg.host}:{port}", flush=True)
    log.info("frontend listening on http://%s:%d", cfg.host, port)
    freeze_startup_objects()
    if fe.keys is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, fe.keys.load)
    system, publisher = None, None
    if cfg.system_port is not None:
        system = SystemServer(cfg.host, cfg.system_port, fe.metrics.exposition)
        sport = await asyncio.to_thread(system.start)
        publisher = asyncio.create_task(_publish_health(fe, system))
        print(f"segue frontend system url=http://{cfg.host}:{sport}", flush=True)
    await stop.wait()
    log.info("frontend stopping: no new connections, finishing streams")
    fe.shutting_down = True
    # Open streams finish until the drain deadline; then background responses are let go
    # (their clients resume at another frontend, which attaches to their running worker)
    # before what is left is cut.
    drained = asyncio.create_task(runner.cleanup())
    await asyncio.wait({drained}, timeout=max(0.0, cfg.shutdown_grace - DETACH_BEFORE_S))
    await fe.responses.background.detach_all(fe.plane.letting_go)
    await drained
    if system is not None and publisher is not None:
        publisher.cancel()
        await asyncio.to_thread(system.stop)
    await fe.close()


async def _publish_health(fe: Frontend, system: SystemServer) -> None:
    """The system port's view of /health, refreshed; its age is the loop's liveness."""
    while True:
        body, ok = fe.health()
        system.publish(health.encode(body), ok)
        await asyncio.sleep(PUBLISH_S)
