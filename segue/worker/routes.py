"""A worker's HTTP routes: the request plane (GET /mux, POST /generate, GET/DELETE
/kv/{key}) and GET /health, GET /metrics.

A call takes a msgpack EngineRequest and answers length-prefixed frames, on a caller's mux
connection (segue.mux) or as the body of a POST /generate. When the caller cancels the call
or goes away, the call's task is cancelled, which aborts the engine request (and any remote
stage this worker called for it). What runs depends on the request's phase and, for a
GENERATE, on this worker's role (segue.disagg; the strategies are worker/decode_first.py and
worker/prefill_first.py):

  GENERATE on aggregated   prefill + decode here
  GENERATE on decode       decode-first: remote prefill, pull the KV, decode here
  GENERATE on prefill      prefill-first: prefill here, remote decode, relay its stream
  PREFILL                  prefill here, answer with a KV handle
  DECODE                   pull the KV named in the request, decode here
  LOCAL                    everything here (the fallback when no prefill worker is left)
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from aiohttp import web
from prometheus_client import generate_latest

from segue import health, tracing
from segue.auth import HEADER, token_ok
from segue.disagg import Strategy
from segue.engines.base import Engine
from segue.log import request_id_var
from segue.mux import MAX_MESSAGE, MuxServer, MuxSink
from segue.protocol import (
    CONTENT_TYPE,
    EngineRequest,
    Error,
    ErrorCode,
    Phase,
    Route,
    decode_request,
    encode_frame,
)
from segue.worker import decode_first, prefill_first
from segue.worker.config import WorkerConfig
from segue.worker.kv_events import KvEventLog
from segue.worker.kv_store import KvStore
from segue.worker.metrics import WorkerMetrics
from segue.worker.session import EngineSessions
from segue.worker.sink import FrameSink, HttpSink, StageError
from segue.worker.stages import Stages

log = logging.getLogger("segue.worker")
_KV_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


class MoveRequest(msgspec.Struct, forbid_unknown_fields=True):
    count: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    request_id: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    live: bool = True  # false: hand back without the KV (the next worker recomputes)


class Routes:
    """Serves the calls and endpoints of one worker; `draining` and `url` are set by its
    lifecycle, `publishes_kv_events` once the engine has started."""

    def __init__(
        self,
        worker_id: str,
        cfg: WorkerConfig,
        engine: Engine,
        sessions: EngineSessions,
        stages: Stages,
        kv: KvStore,
        kv_events: KvEventLog,
        metrics: WorkerMetrics,
        token: str | None,
    ) -> None:
        self.id = worker_id
        self.cfg = cfg
        self.engine = engine
        self.sessions = sessions
        self.stages = stages
        self.kv = kv
        self.kv_events = kv_events
        self.metrics = metrics
        self.token = token
        self.url = ""
        self.draining = False
        self.publishes_kv_events = False
        self._calls = 0  # open calls (including remote-stage waits)
        self._kv_tokens = 0  # the tokens those calls may need in KV (prompt + max_tokens)
        self.idle = asyncio.Event()
        self.idle.set()
        self.muxes: set[MuxServer] = set()

    @property
    def calls(self) -> int:
        return self._calls

    @property
    def healthy(self) -> bool:
        return self.sessions.failure is None and self.engine.healthy

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._require_token])
        app.router.add_get(Route.MUX, self.mux)
        app.router.add_get(Route.KV_EVENTS, self.serve_kv_events)
        app.router.add_post(Route.ADMIN_MOVE, self.admin_move)
        app.router.add_post(Route.GENERATE, self.generate)
        app.router.add_get(Route.KV, self.kv_pull)
        app.router.add_delete(Route.KV, self.kv_drop)
        app.router.add_get(Route.HEALTH, self.handle_health)
        app.router.add_get(Route.METRICS, self.handle_metrics)
        return app

    @web.middleware
    async def _require_token(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """With a cluster token set, the request plane answers only callers that carry it
        (health and metrics stay open for probes and scrapers)."""
        if request.path in (Route.HEALTH, Route.METRICS) or token_ok(
            self.token, request.headers.get(HEADER)
        ):
            return await handler(request)
        return web.json_response({"error": "missing or wrong cluster token"}, status=401)

    async def handle_health(self, request: web.Request) -> web.Response:
        healthy = self.healthy
        status = (
            health.WorkerStatus.DRAINING
            if self.draining
            else health.WorkerStatus.OK
            if healthy
            else health.WorkerStatus.UNHEALTHY
        )
        body = health.WorkerHealth(
            status, self.id, self.cfg.role, os.getpid(), self.url, self.engine.stats()
        )
        return web.Response(
            body=health.encode(body),
            status=200 if healthy else 503,
            content_type="application/json",
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), content_type="text/plain")

    async def kv_pull(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        payload = self.kv.take(key) if _KV_KEY_RE.match(key) else None
        if payload is None:
            return web.json_response(
                {"error": f"no KV payload {key!r} (expired, freed or never made)"}, status=404
            )
        return web.Response(body=payload, content_type="application/octet-stream")

    async def kv_drop(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        ok = _KV_KEY_RE.match(key) and self.kv.drop(key, "its request was cancelled")
        return web.Response(status=204 if ok else 404)

    async def mux(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, compress=False)
        await ws.prepare(request)
        server = MuxServer(ws, self._mux_call)
        self.muxes.add(server)
        try:
            await server.run()
        finally:
            self.muxes.discard(server)
        return ws

    async def serve_kv_events(self, request: web.Request) -> web.StreamResponse:
        if not self.publishes_kv_events:
            return web.json_response({"error": "this engine has no prefix cache"}, status=404)
        return await self.kv_events.serve(request)

    async def admin_move(self, request: web.Request) -> web.Response:
        """Moves running requests to other workers, live where the engine can export their
        KV: `{"count": N}` (the N most recent) or `{"request_id": ID}`; `"live": false`
        hands them back without their KV."""
        try:
            body = msgspec.json.decode(await request.read(), type=MoveRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"bad move request: {e}"}, status=400)
        active = list(self.sessions.active)
        if body.request_id is not None:
            wanted = [body.request_id]
        else:
            wanted = active[len(active) - body.count :] if body.count else []
        moved = self.sessions.move(wanted, live=body.live)
        log.info("admin: moving %d requests: %s", len(moved), moved)
        return web.json_response({"moved": moved})

    async def close_muxes(self) -> None:
        """Shutdown: what the calls wrote goes out, then the connections close."""
        await asyncio.gather(*(m.close() for m in list(self.muxes)), return_exceptions=True)

    async def _mux_call(self, payload: bytes, sink: MuxSink) -> None:
        try:
            req = decode_request(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            error = Error(ErrorCode.BAD_REQUEST, f"bad engine request: {e}", False)
            await sink.write_eof(encode_frame(error))
            return
        await self._serve(req, sink)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = decode_request(await request.read())
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"bad engine request: {e}"}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await resp.prepare(request)
        await self._serve(req, HttpSink(request, resp))
        return resp

    async def _serve(self, req: EngineRequest, sink: FrameSink) -> None:
        request_id_var.set(req.request_id)
        if self.draining or not self.healthy:
            code = ErrorCode.DRAINING if self.draining else ErrorCode.ENGINE_UNHEALTHY
            await sink.write_eof(encode_frame(Error(code, f"worker {self.id} is {code}", True)))
            return
        need = len(req.token_ids) + req.max_tokens
        why = self._over_limit(need)
        if why is not None:
            self.metrics.rejections.inc()
            await sink.write_eof(encode_frame(Error(ErrorCode.OVERLOADED, why, True)))
            return
        log.info("New Request ID: %s", req.request_id)
        self.metrics.requests.inc()
        self._calls += 1
        self._kv_tokens += need
        self.idle.clear()
        span = None
        if tracing.tracer is not None and req.traceparent:
            span, req = self._trace(req)
        try:
            await self._dispatch(req, sink)
        except StageError as e:
            log.warning("request %s failed: %s", req.request_id, e)
            if span is not None:
                tracing.fail(span, str(e))
            await sink.write_eof(encode_frame(e.frame))
        except asyncio.CancelledError:
            if span is not None:
                span.add_event("cancelled", {"reason": "the caller left"})
                tracing.fail(span, "cancelled")
            raise
        finally:
            self._calls -= 1
            self._kv_tokens -= need
            if self._calls == 0:
                self.idle.set()
            if span is not None:
                span.end()

    def _trace(self, req: EngineRequest) -> tuple[Any, EngineRequest]:
        """This call's span under its caller's, and the request carrying it on (to the
        remote stage this worker may call)."""
        span = tracing.start(
            "segue.worker.call",
            req.traceparent,
            {
                "gen_ai.request.id": req.request_id,
                "segue.worker.id": self.id,
                "segue.worker.role": self.cfg.role.value,
                "segue.phase": req.phase.value,
                "segue.context_tokens": len(req.token_ids),
                "gen_ai.request.max_tokens": req.max_tokens,
            },
            server=True,
        )
        tracing.current.set(span)
        return span, msgspec.structs.replace(req, traceparent=tracing.traceparent(span))

    def _over_limit(self, need: int) -> str | None:
        """Why a new call needing `need` tokens of KV is refused, if it is: past the calls
        limit, or past the KV the held calls may need (as tokens: engines count blocks of
        their own size; the first call is always let in, the engine judges it alone)."""
        cfg = self.cfg
        if self._calls >= cfg.max_pending:
            return f"worker {self.id} is at its admission limit ({cfg.max_pending} calls)"
        if cfg.max_pending_kv and self._calls:
            stats = self.engine.stats()
            capacity = stats.kv_blocks_total * stats.block_size * cfg.max_pending_kv
            if capacity and self._kv_tokens + need > capacity:  # 0: the engine does not say
                return (
                    f"worker {self.id} is at its KV admission limit (its calls may need "
                    f"{self._kv_tokens} tokens of KV; --max-pending-kv {cfg.max_pending_kv})"
                )
        return None

    async def _dispatch(self, req: EngineRequest, resp: FrameSink) -> None:
        stages = self.stages
        phase = req.phase
        if phase is Phase.GENERATE:
            strategy = Strategy.of_worker(self.cfg.role)
            if strategy is Strategy.DECODE_FIRST:
                await decode_first.run(stages, req, resp, self.cfg.prefill_fallback)
            elif strategy is Strategy.PREFILL_FIRST:
                await prefill_first.run(stages, req, resp)
            else:
                await stages.local(req, resp)
        elif phase is Phase.LOCAL:
            await stages.local(req, resp)
        elif phase is Phase.PREFILL:
            await stages.prefill(req, resp)
        else:
            await stages.decode(req, req.kv, resp)
