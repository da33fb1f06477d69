"""A worker's life: start the engine, listen, register in discovery, serve; on SIGTERM
drain (leave discovery, refuse new calls with a retryable `draining` error, let in-flight
requests finish within the drain timeout, then hand the rest back so their callers migrate
them) and exit 0; a second signal exits at once. A worker whose engine died or hung leaves
discovery and exits ENGINE_FAILED_EXIT for a supervisor to restart it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import aiohttp
from aiohttp import web

from segue.auth import client_headers, load_cluster_token
from segue.discovery import Discovery, Instance, ModelCard
from segue.engines.base import Engine
from segue.lifetime import freeze_startup_objects
from segue.log import fields as log_fields
from segue.protocol import Role
from segue.router import Router
from segue.transport import RequestPlane
from segue.worker.config import WorkerConfig
from segue.worker.kv_events import KvEventLog
from segue.worker.kv_store import KvStore
from segue.worker.metrics import WorkerMetrics
from segue.worker.monitor import monitor_engines
from segue.worker.routes import Routes
from segue.worker.session import EngineSessions
from segue.worker.stages import Stages

log = logging.getLogger("segue.worker")
# Exit code of a worker whose engine died or hung: a supervisor should start a new one.
ENGINE_FAILED_EXIT = 3


class Worker:
    """Complete after construction (it makes its HTTP session: build it inside the event
    loop); `run` serves until stopped."""

    def __init__(
        self,
        engine: Engine,
        discovery: Discovery,
        cfg: WorkerConfig,
        card: ModelCard | None = None,
        owns_discovery: bool = True,
    ) -> None:
        self.engine = engine
        self.card = card or ModelCard()
        self.discovery = discovery
        self.owns_discovery = owns_discovery  # closes it on exit (a fleet's is shared)
        self.cfg = cfg
        self.id = f"{cfg.role[0]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        log_fields.worker_id = self.id  # on every JSON log line of this process
        self.metrics = WorkerMetrics(engine)
        self.kv = KvStore(engine, cfg.kv_ttl, self.metrics.registry)
        self.sessions = EngineSessions(
            engine,
            self.metrics,
            self.kv,
            cfg.keepalive,
            cfg.fault_exit_after_tokens,
            cfg.detach_grace,
        )
        self.token = load_cluster_token(cfg.cluster_token_file)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, enable_cleanup_closed=True),
            headers=client_headers(self.token),
        )
        self.router = Router(session=self.session)  # peers of the other stage
        self.plane = RequestPlane(self.session, cfg.request_plane, cfg.stall_timeout)
        self.stages = Stages(
            self.sessions,
            self.kv,
            self.router,
            self.plane,
            self.metrics,
            cfg.stall_timeout,
            cfg.keepalive,
        )
        self.kv_events = KvEventLog()
        self.routes = Routes(
            self.id,
            cfg,
            engine,
            self.sessions,
            self.stages,
            self.kv,
            self.kv_events,
            self.metrics,
            self.token,
        )

    @property
    def url(self) -> str:
        return self.routes.url

    @property
    def healthy(self) -> bool:
        return self.routes.healthy

    @property
    def draining(self) -> bool:
        return self.routes.draining

    async def _watch_peers(self) -> None:
        async for instances in self.discovery.watch():
            self.router.update({k: v for k, v in instances.items() if k != self.id})

    async def run(self, stop: asyncio.Event, monitored: bool = False, process: str = "") -> int:
        """Serves until `stop`; returns the exit code. `monitored`: a fleet watches this
        worker's engine (segue.worker.fleet), else the worker does; `process`: the fleet's
        process id, published with the worker."""
        await self.engine.start()
        self.routes.publishes_kv_events = self.engine.publish_kv_events(self.kv_events)
        tasks = []
        if not monitored:
            watched = [(self.engine, self.sessions, stop)]
            stall = self.cfg.engine_stall_timeout
            tasks.append(asyncio.create_task(monitor_engines(watched, stall)))
        if self.cfg.role is not Role.AGGREGATED:
            tasks.append(asyncio.create_task(self._watch_peers()))
        runner = web.AppRunner(self.routes.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        sock = listen_socket(self.cfg.host, self.cfg.port, self.cfg.caller_timeout)
        site = web.SockSite(runner, sock)
        await site.start()
        port = sock.getsockname()[1]
        host = self.cfg.advertise_host or advertised_host(self.cfg.host)
        self.routes.url = self.kv.url = f"http://{host}:{port}"
        inst = Instance(
            id=self.id,
            role=self.cfg.role,
            url=self.url,
            pid=os.getpid(),
            host=socket.gethostname(),
            card=self.card,
            process=process,
        )
        if not monitored:  # a fleet's replicas share the process: its objects are few
            freeze_startup_objects()
        lease = await self.discovery.register(inst, self.cfg.lease_ttl)
        print(f"segue worker ready id={self.id} role={self.cfg.role} url={self.url}", flush=True)
        log.info("worker %s ready at %s", self.id, self.url)
        await stop.wait()
        failure = self.sessions.failure
        if failure is not None:
            # Nothing left to drain: the requests are failing over. Leave discovery now
            # and let their error frames go out; the engine is not touched (a hung one may
            # never return from a stop).
            await lease.revoke()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.routes.idle.wait(), 5.0)
        else:
            log.info("draining: leaving discovery, %d requests in flight", self.routes.calls)
            self.routes.draining = True
            await lease.revoke()
            await self.drain()
        for t in tasks:
            t.cancel()
        await self.routes.close_muxes()
        await self.kv_events.close()
        await runner.cleanup()
        await self.router.close()
        await self.plane.close()
        await self.session.close()
        if failure is not None:
            self.engine.release_files()
            log.error("worker %s exiting: %s", self.id, failure.value)
            return ENGINE_FAILED_EXIT
        self.kv.clear()
        await self.engine.stop()
        if self.owns_discovery:
            await self.discovery.close()
        log.info("worker %s stopped", self.id)
        return 0

    async def drain(self) -> None:
        """Waits for in-flight calls; past the drain timeout, hands the rest back (live, with
        their KV, where the engine can export it), then waits for that KV to be pulled."""
        try:
            await asyncio.wait_for(self.routes.idle.wait(), self.cfg.drain_timeout)
        except TimeoutError:
            log.info("drain timeout: handing back %d requests", len(self.sessions.active))
            self.sessions.hand_back_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.routes.idle.wait(), 5.0)
        with contextlib.suppress(TimeoutError):  # unpulled KV expires anyway
            await asyncio.wait_for(self.kv.empty.wait(), min(self.cfg.kv_ttl, 10.0))


def listen_socket(host: str, port: int, caller_timeout: float) -> socket.socket:
    """The worker's listening socket. TCP_USER_TIMEOUT (inherited by accepted connections)
    drops a connection whose sent data stays unacknowledged for `caller_timeout` seconds: a
    caller cut off by a partition sends no FIN, and this is how its requests get aborted
    (frames, keep-alives included, always flow while a request runs)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if caller_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(caller_timeout * 1000))
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def advertised_host(bound: str) -> str:
    """What to publish for a bound address: itself, or for a wildcard the address this
    host uses to reach others (a UDP connect sends nothing)."""
    if bound not in ("0.0.0.0", "::", ""):
        return bound
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere
            addr: str = s.getsockname()[0]
            return addr
        except OSError:
            return "127.0.0.1"
