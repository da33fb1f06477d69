"""A worker: one engine behind the request plane, registered in discovery.

Serves POST /generate (msgpack request in, length-prefixed frames out), GET /health and
GET /metrics. When the caller goes away (aiohttp cancels the handler), the engine request
is aborted and its KV freed. SIGTERM drains: leave discovery, answer new calls with a
retryable "draining" frame, let in-flight requests finish within the drain timeout, then
hand the rest back (a HandBack frame) so the caller migrates them; exit 0. A second signal
exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from segue.discovery import Discovery, Instance
from segue.engines.base import Engine, EngineRequestError, RequestStream
from segue.log import request_id_var
from segue.protocol import (
    CONTENT_TYPE,
    GENERATE_PATH,
    Error,
    Final,
    HandBack,
    KeepAlive,
    Tokens,
    decode_request,
    encode_frame,
)

log = logging.getLogger("segue.worker")
_KEEPALIVE_FRAME = encode_frame(KeepAlive())


@dataclass
class WorkerConfig:
    role: str = "aggregated"
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "segue-mocker"
    lease_ttl: float = 2.0
    keepalive_s: float = 0.5
    drain_timeout: float = 30.0
    # Fault injection for tests: the process dies (os._exit) right after it has sent the
    # token at this offset of a client's output, before any final frame.
    exit_after_tokens: int | None = None


class Worker:
    def __init__(self, engine: Engine, discovery: Discovery, cfg: WorkerConfig) -> None:
        self.engine = engine
        self.discovery = discovery
        self.cfg = cfg
        self.id = f"{cfg.role[0]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.url = ""
        self.active: dict[str, RequestStream] = {}
        self.draining = False
        self.handing_back = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "segue_worker_requests", "Engine requests started", registry=self.registry
        )
        self.aborts_total = Counter(
            "segue_worker_aborts", "Engine requests aborted because the caller went away",
            registry=self.registry,
        )
        self.output_tokens = Counter(
            "segue_worker_output_tokens", "Tokens sent to callers", registry=self.registry
        )
        for name, doc, attr in (
            ("segue_engine_running_requests", "Requests running in the engine", "running"),
            ("segue_engine_waiting_requests", "Requests waiting in the engine", "waiting"),
            ("segue_engine_kv_blocks_used", "KV cache blocks in use", "kv_blocks_used"),
            ("segue_engine_kv_blocks_total", "KV cache blocks in the pool", "kv_blocks_total"),
        ):
            g = Gauge(name, doc, registry=self.registry)
            g.set_function(lambda a=attr: getattr(self.engine.stats(), a))

    # -- HTTP handlers -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(GENERATE_PATH, self.handle_generate)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    async def handle_health(self, request: web.Request) -> web.Response:
        s = self.engine.stats()
        healthy = self.engine.healthy
        body = {
            "status": "draining" if self.draining else ("ok" if healthy else "unhealthy"),
            "id": self.id,
            "role": self.cfg.role,
            "pid": os.getpid(),
            "url": self.url,
            "engine": dataclasses.asdict(s),
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = decode_request(await request.read())
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"bad engine request: {e}"}, status=400)
        request_id_var.set(req.request_id)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        if self.draining or not self.engine.healthy:
            code = "draining" if self.draining else "engine_unhealthy"
            await resp.prepare(request)
            await resp.write(encode_frame(Error(code, f"worker {self.id} is {code}", True)))
            return resp
        log.info("New Request ID: %s", req.request_id)
        self.requests_total.inc()
        try:
            stream = self.engine.add_request(req)
        except EngineRequestError as e:
            await resp.prepare(request)
            await resp.write(encode_frame(Error("bad_request", str(e))))
            return resp
        self.active[req.request_id] = stream
        self._idle.clear()
        try:
            await resp.prepare(request)
            await self._pump(req.start_offset, stream, resp)
        finally:
            self.active.pop(req.request_id, None)
            if not self.active:
                self._idle.set()
            # Still live in the engine means the caller went away (or the write failed).
            if self.engine.abort(req.request_id):
                self.aborts_total.inc()
                log.info("Aborted Request ID: %s (t=%.6f)", req.request_id, time.time())
        return resp

    async def _pump(self, offset: int, stream: RequestStream, resp: web.StreamResponse) -> None:
        while True:
            out = await stream.get(self.cfg.keepalive_s)
            if out is None:
                await resp.write(_KEEPALIVE_FRAME)
                continue
            data = b""
            ids = out.token_ids
            if ids:
                crash_at = self.cfg.exit_after_tokens
                if crash_at is not None and offset + len(ids) >= crash_at:
                    await resp.write(encode_frame(Tokens(offset, ids[: crash_at - offset])))
                    log.warning("fault injection: exiting after token %d", crash_at)
                    os._exit(9)
                data = encode_frame(Tokens(offset, ids))
                offset += len(ids)
                self.output_tokens.inc(len(ids))
            reason = out.finish_reason
            if reason == "abort":
                if not self.handing_back:
                    return  # aborted for its caller: nobody to tell
                log.info("Handed back Request ID: %s", stream.request_id)
                data += encode_frame(HandBack("worker shutting down"))
            elif reason == "error":
                data += encode_frame(Error("engine_error", out.error or "engine failed", True))
            elif reason is not None:
                data += encode_frame(Final(reason, offset))
            if data:
                await resp.write(data)
            if reason is not None:
                return

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.engine.start()
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.cfg.host}:{port}"
        inst = Instance(
            id=self.id, role=self.cfg.role, url=self.url, pid=os.getpid(),
            host=socket.gethostname(), model=self.cfg.model,
        )
        lease = await self.discovery.register(inst, self.cfg.lease_ttl)
        print(f"segue worker ready id={self.id} role={self.cfg.role} url={self.url}", flush=True)
        log.info("worker %s ready at %s", self.id, self.url)
        await stop.wait()
        log.info("draining: leaving discovery, %d requests in flight", len(self.active))
        self.draining = True
        await lease.revoke()
        try:
            await asyncio.wait_for(self._idle.wait(), self.cfg.drain_timeout)
        except TimeoutError:
            log.info("drain timeout: handing back %d requests", len(self.active))
            self.handing_back = True
            for rid in list(self.active):
                self.engine.abort(rid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
        await runner.cleanup()
        await self.engine.stop()
        await self.discovery.close()
        log.info("worker %s stopped", self.id)


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT starts a graceful stop; a second one exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logging.getLogger("segue").warning("second signal: exiting now")
            os._exit(1)
        logging.getLogger("segue").info("got %s", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
