"""A worker: one engine behind the request plane, registered in discovery.

Serves POST /generate (msgpack request in, length-prefixed frames out), GET/DELETE
/kv/{key} (prefilled KV for decode workers), GET /health and GET /metrics. When the caller
goes away (aiohttp cancels the handler), the engine request is aborted and its KV freed,
and any remote stage this worker called is cancelled with it. SIGTERM drains: leave
discovery, answer new calls with a retryable "draining" frame, let in-flight requests
finish within the drain timeout, then hand the rest back (a HandBack frame) so the caller
migrates them; exit 0. A second signal exits at once.

What a worker does with a request depends on its role and the request's phase:
  aggregated            prefill + decode here
  decode   (decode-first)  call a prefill worker, pull the KV, decode here
  prefill  (prefill-first) prefill here, call a decode worker with the KV, relay its stream
  phase=prefill         prefill here, answer with a KV handle
  phase=decode          pull the KV named in the request, decode here
  phase=local           do it all here (the fallback when no prefill worker is left)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

from segue.discovery import Discovery, Instance
from segue.engines.base import Engine, EngineRequestError, RequestStream
from segue.log import request_id_var
from segue.protocol import (
    CONTENT_TYPE,
    GENERATE_PATH,
    EngineRequest,
    Error,
    Final,
    HandBack,
    KeepAlive,
    KvHandle,
    Prefilled,
    Tokens,
    decode_request,
    encode_frame,
    token_digest,
)
from segue.router import Router
from segue.transport import CallFailed, call, client_timeout, drop_kv, fetch_kv
from segue.worker.kv_store import KvStore

log = logging.getLogger("segue.worker")
_KEEPALIVE_FRAME = encode_frame(KeepAlive())
_KV_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
# Exit code of a worker whose engine died or hung: a supervisor should start a new one.
ENGINE_FAILED_EXIT = 3
_FIRST_STAGE = {"aggregated": "local", "decode": "decode-first", "prefill": "prefill-first"}


class _PromptTokensCollector:
    """segue_engine_prompt_tokens_total{source}: where the engine got each prompt token's KV
    (computed here, its own prefix cache, or loaded from another worker), as the engine
    counts it; engines that do not count report nothing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        c = CounterMetricFamily("segue_engine_prompt_tokens", "Prompt tokens by where their "
                                "KV came from", labels=["source"])
        for source, n in self.engine.stats().prompt_tokens.items():
            c.add_metric([source], n)
        yield c


class StageError(Exception):
    """Ends a call with an Error frame (the caller decides whether to retry)."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.frame = Error(code, message, retryable)


@dataclass
class WorkerConfig:
    role: str = "aggregated"
    host: str = "127.0.0.1"
    port: int = 0
    model: str = "segue-mocker"
    lease_ttl: float = 10.0
    keepalive_s: float = 0.5
    drain_timeout: float = 30.0
    stall_timeout: float = 5.0  # for calls this worker makes to remote stages
    kv_ttl: float = 30.0
    prefill_fallback: str = "none"  # "local": a decode worker with no prefill peer prefills
    engine_stall_timeout: float = 120.0  # no engine progress this long with work: hung
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
        self._progress = time.monotonic()  # last output of the engine, or start of its work
        self.engine_failed: str | None = None  # engine_dead | engine_hung: gone for good
        self.draining = False
        self.handing_back = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._calls = 0  # open /generate calls (including remote-stage waits)
        self.session: aiohttp.ClientSession | None = None
        self.router: Router | None = None
        self.timeout = client_timeout(cfg.stall_timeout)
        self.registry = r = CollectorRegistry()
        self.requests_total = Counter("segue_worker_requests", "Engine requests started",
                                      registry=r)
        self.aborts_total = Counter(
            "segue_worker_aborts", "Engine requests aborted because the caller went away",
            registry=r,
        )
        self.remote_aborts_total = Counter(
            "segue_worker_remote_aborts", "Remote stages cancelled because the caller went away",
            registry=r,
        )
        self.output_tokens = Counter("segue_worker_output_tokens", "Tokens sent to callers",
                                     registry=r)
        for name, doc, attr in (
            ("segue_engine_running_requests", "Requests running in the engine", "running"),
            ("segue_engine_waiting_requests", "Requests waiting in the engine", "waiting"),
            ("segue_engine_kv_blocks_used", "KV cache blocks in use", "kv_blocks_used"),
            ("segue_engine_kv_blocks_total", "KV cache blocks in the pool", "kv_blocks_total"),
        ):
            g = Gauge(name, doc, registry=r)
            g.set_function(lambda a=attr: getattr(self.engine.stats(), a))
        r.register(_PromptTokensCollector(engine))
        self.kv = KvStore(engine, cfg.kv_ttl, r)

    # -- HTTP handlers -------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(GENERATE_PATH, self.handle_generate)
        app.router.add_get("/kv/{key}", self.handle_kv_pull)
        app.router.add_delete("/kv/{key}", self.handle_kv_drop)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    @property
    def healthy(self) -> bool:
        return self.engine_failed is None and self.engine.healthy

    async def handle_health(self, request: web.Request) -> web.Response:
        healthy = self.healthy
        body = {
            "status": "draining" if self.draining else ("ok" if healthy else "unhealthy"),
            "id": self.id,
            "role": self.cfg.role,
            "pid": os.getpid(),
            "url": self.url,
            "engine": dataclasses.asdict(self.engine.stats()),
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def handle_kv_pull(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        payload = self.kv.take(key) if _KV_KEY_RE.match(key) else None
        if payload is None:
            return web.json_response({"error": f"no KV payload {key!r} (expired, freed or "
                                               "never made)"}, status=404)
        return web.Response(body=payload, content_type="application/octet-stream")

    async def handle_kv_drop(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        ok = _KV_KEY_RE.match(key) and self.kv.drop(key, "its request was cancelled")
        return web.Response(status=204 if ok else 404)

    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        try:
            req = decode_request(await request.read())
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return web.json_response({"error": f"bad engine request: {e}"}, status=400)
        request_id_var.set(req.request_id)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await resp.prepare(request)
        if self.draining or not self.healthy:
            code = "draining" if self.draining else "engine_unhealthy"
            await resp.write(encode_frame(Error(code, f"worker {self.id} is {code}", True)))
            return resp
        log.info("New Request ID: %s", req.request_id)
        self.requests_total.inc()
        phase = _FIRST_STAGE[self.cfg.role] if req.phase == "generate" else req.phase
        self._calls += 1
        self._idle.clear()
        try:
            if phase == "local":
                await self._run_engine(req, resp)
            elif phase == "prefill":
                key = await self._run_engine(req, resp)
                if key is not None:
                    await self._hand_over(key, req, request, resp)
            elif phase == "decode":
                await self._decode(req, req.kv, resp)
            elif phase == "decode-first":
                await self._decode_first(req, resp)
            elif phase == "prefill-first":
                await self._prefill_first(req, resp)
            else:
                raise StageError("bad_request", f"unknown phase {req.phase!r}", False)
        except StageError as e:
            log.warning("request %s failed: %s", req.request_id, e)
            await resp.write(encode_frame(e.frame))
        finally:
            self._calls -= 1
            if self._calls == 0:
                self._idle.set()
        return resp

    # -- stages --------------------------------------------------------------------------

    async def _run_engine(self, req: EngineRequest, resp: web.StreamResponse,
                          payload: bytes | None = None) -> str | None:
        """Runs the request in the engine, streaming Tokens/KeepAlive frames to the caller.
        Returns the KV key of a finished prefill; writes the final frame of anything else."""
        try:
            stream = self.engine.add_request(req, payload)
        except EngineRequestError as e:
            code = "kv_mismatch" if req.phase == "decode" else "bad_request"
            raise StageError(code, str(e), retryable=code == "kv_mismatch") from None
        if not self.active:  # the engine's idle time is not a stall
            self._progress = time.monotonic()
        self.active[req.request_id] = stream
        returned = False
        try:
            key = await self._pump(req.start_offset, stream, resp)
            returned = True
            return key
        finally:
            self.active.pop(req.request_id, None)
            # Still live in the engine means the caller went away (or the write failed).
            if self.engine.abort(req.request_id) and not self.engine_failed:
                self.aborts_total.inc()
                log.info("Aborted Request ID: %s (t=%.6f)", req.request_id, time.time())
            elif not returned and isinstance(stream.result, str):
                # The prefill finished in the same moment its caller left: nobody will
                # ever hear of this KV, so free it now.
                self.engine.release_kv(stream.result)
                self.aborts_total.inc()
                log.info("Aborted Request ID: %s (t=%.6f, prefill had just finished)",
                         req.request_id, time.time())

    async def _pump(self, offset: int, stream: RequestStream,
                    resp: web.StreamResponse) -> str | None:
        while True:
            out = await stream.get(self.cfg.keepalive_s)
            if out is None:
                await resp.write(_KEEPALIVE_FRAME)
                continue
            self._progress = time.monotonic()
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
            if reason == "prefilled":
                if data:
                    await resp.write(data)
                return stream.result  # type: ignore[return-value]
            if reason == "abort":
                if not self.handing_back:
                    return None  # aborted for its caller: nobody to tell
                log.info("Handed back Request ID: %s", stream.request_id)
                data += encode_frame(HandBack("worker shutting down"))
            elif reason == "error":
                code = "engine_hung" if self.engine_failed == "engine_hung" else "engine_error"
                data += encode_frame(Error(code, out.error or "engine failed", True))
            elif reason is not None:
                data += encode_frame(Final(reason, offset))
            if reason is not None:
                await resp.write_eof(data)  # the final frame and the end of the body at once
                return None
            if data:
                await resp.write(data)

    async def _hand_over(self, key: str, req: EngineRequest, request: web.Request,
                         resp: web.StreamResponse) -> None:
        """Answer a prefill with its KV handle; if the caller is already gone (it gave up
        on us, e.g. after a stall), free the KV now rather than at its TTL."""
        transport = request.transport
        if transport is None or transport.is_closing():
            self.engine.release_kv(key)
            log.info("prefill %s done after its caller left: KV freed", req.request_id)
            return
        handle = self._publish(key, req)
        try:
            await resp.write(encode_frame(Prefilled(handle)))
        except BaseException:
            self.kv.drop(key, "its caller left")
            raise

    def _publish(self, key: str, req: EngineRequest) -> KvHandle:
        """Keeps a prefilled KV for pulling and describes it."""
        self.kv.put(key)
        return KvHandle(url=self.url, kv_id=key, num_tokens=len(req.token_ids),
                        digest=token_digest(req.token_ids),
                        nbytes=self.engine.kv_nbytes(key))

    async def _decode(self, req: EngineRequest, kv: KvHandle | None,
                      resp: web.StreamResponse) -> None:
        """Pull the KV named by `kv`, check it is this request's, decode here."""
        if kv is None:
            raise StageError("bad_request", "a decode needs a KV handle", False)
        if kv.num_tokens != len(req.token_ids) or kv.digest != token_digest(req.token_ids):
            raise StageError("kv_mismatch", "KV handle is for other tokens", True)
        try:
            payload = await self._with_keepalive(
                resp, fetch_kv(self.session, kv.url, kv.kv_id, self.timeout))
        except CallFailed as e:
            raise StageError("remote_failed", f"KV pull from {kv.url} failed: {e.reason}",
                             True) from None
        except (asyncio.CancelledError, ConnectionResetError):
            # Our caller left mid-transfer: the holder may not have served the pull yet.
            asyncio.get_running_loop().create_task(drop_kv(self.session, kv.url, kv.kv_id))
            raise
        await self._run_engine(msgspec.structs.replace(req, phase="decode", kv=kv), resp, payload)

    async def _decode_first(self, req: EngineRequest, resp: web.StreamResponse) -> None:
        """Decode worker first: get the prompt prefilled remotely, then decode here."""
        inst = self.router.pick(("prefill",))
        if inst is None:
            if self.cfg.prefill_fallback == "local":
                log.info("no prefill worker: prefilling %s locally", req.request_id)
                await self._run_engine(req, resp)
                return
            raise StageError("unavailable", "no prefill worker available", False)
        kv = None
        prefill = msgspec.structs.replace(req, phase="prefill")
        with self._remote_stage(req, inst, "prefill"):
            async with contextlib.aclosing(self._relay(resp, inst, prefill)) as frames:
                async for f in frames:
                    if type(f) is Prefilled:
                        kv = f.kv
                        break
                    raise self._remote_failure(inst, "prefill", f)
        if kv is None:
            raise self._remote_failure(inst, "prefill", CallFailed("stream_ended", inst))
        await self._decode(req, kv, resp)

    async def _prefill_first(self, req: EngineRequest, resp: web.StreamResponse) -> None:
        """Prefill worker first: prefill here, then have a decode worker pull the KV and
        relay its stream."""
        key = await self._run_engine(msgspec.structs.replace(req, phase="prefill"), resp)
        if key is None:
            return
        kv = self._publish(key, req)
        try:
            inst = self.router.pick(("decode",))
            if inst is None:
                raise StageError("unavailable", "no decode worker available", False)
            with self._remote_stage(req, inst, "decode"):
                decode = msgspec.structs.replace(req, phase="decode", kv=kv)
                async with contextlib.aclosing(self._relay(resp, inst, decode)) as frames:
                    async for f in frames:
                        if type(f) is Tokens or type(f) is Final:
                            await resp.write(encode_frame(f))
                            if type(f) is Final:
                                return
                        else:
                            raise self._remote_failure(inst, "decode", f)
            raise self._remote_failure(inst, "decode", CallFailed("stream_ended", inst))
        finally:
            self.kv.drop(key, "request over before its KV was pulled")

    def _remote_failure(self, inst: Instance, stage: str, f) -> StageError:
        """What to tell our caller when the remote stage failed (a frame or CallFailed)."""
        if type(f) is Error and not f.retryable:
            return StageError(f.code, f.message, False)
        if isinstance(f, CallFailed):
            self.router.mark_down(inst, f.reason)
            why = f.reason
        else:
            why = f"answered {type(f).__name__}" + (f" {f.code}" if type(f) is Error else "")
        return StageError("remote_failed", f"remote {stage} on {inst.id} failed: {why}", True)

    async def _relay(self, resp: web.StreamResponse, inst: Instance, req: EngineRequest):
        """Frames of a call to a remote stage, minus its keep-alives. Our own keep-alives go
        to our caller while we wait, so its stall timer judges us, not our peer. Failures
        of the call come out as CallFailed frames (see _remote_failure)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for f in call(self.session, inst, req, self.timeout):
                    if type(f) is not KeepAlive:
                        await queue.put(f)
                await queue.put(CallFailed("stream_ended", inst))
            except CallFailed as e:
                await queue.put(e)
            except Exception as e:  # never leave the relay waiting on a dead pump
                log.exception("relay to %s failed", inst.id)
                await queue.put(CallFailed(f"relay_error: {e!r}", inst))

        task = asyncio.create_task(pump())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self.cfg.keepalive_s)
                except TimeoutError:
                    await resp.write(_KEEPALIVE_FRAME)
                    continue
                yield item
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def _remote_stage(self, req: EngineRequest, inst: Instance, stage: str):
        """Logs (and counts) a remote stage cancelled because our caller went away."""
        try:
            with self.router.track(inst):
                yield
        except (asyncio.CancelledError, ConnectionResetError):
            self.remote_aborts_total.inc()
            log.info("Aborted Remote Request ID: %s (%s on %s, t=%.6f)", req.request_id, stage,
                     inst.id, time.time())
            raise

    async def _with_keepalive(self, resp: web.StreamResponse, work: Awaitable):
        """Await `work`, sending keep-alive frames meanwhile so the caller's stall timer
        does not fire on a slow but live transfer."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.cfg.keepalive_s)
                if done:
                    return task.result()
                await resp.write(_KEEPALIVE_FRAME)
        finally:
            task.cancel()

    # -- lifecycle -----------------------------------------------------------------------

    async def _watch(self) -> None:
        async for instances in self.discovery.watch():
            self.router.update({k: v for k, v in instances.items() if k != self.id})

    async def _engine_watchdog(self, stop: asyncio.Event) -> None:
        """Watches for an engine that failed for good, and then stops the worker.

        Dead: the engine reports itself unhealthy (e.g. vLLM's engine core is gone); its
        requests end with retryable errors on their own. Hung: a live engine holds requests
        and has produced nothing at all for --engine-stall-timeout, while this process keeps
        every caller's stall timer quiet with keep-alives; its requests are failed here.
        Either way the requests migrate, and the worker leaves discovery and exits (see
        `run`): neither state recovers, and an exit lets a supervisor restart it."""
        limit = self.cfg.engine_stall_timeout
        while True:
            await asyncio.sleep(min(0.25, limit / 4) if limit > 0 else 0.25)
            idle_for = time.monotonic() - self._progress
            if not self.engine.healthy:
                self.engine_failed, why = "engine_dead", "engine died"
            elif limit > 0 and self.active and idle_for > limit:
                self.engine_failed = "engine_hung"
                why = f"engine made no progress for {idle_for:.1f}s"
                for stream in list(self.active.values()):
                    stream.finish("error", why)
            else:
                continue
            log.error("%s with %d requests: failing them over, leaving discovery, exiting",
                      why, len(self.active))
            stop.set()
            return

    async def run(self, stop: asyncio.Event) -> int:
        """Serves until `stop`; returns the exit code."""
        await self.engine.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, enable_cleanup_closed=True))
        self.router = Router("round-robin", self.session)
        watch = asyncio.create_task(self._watch()) if self.cfg.role != "aggregated" else None
        watchdog = asyncio.create_task(self._engine_watchdog(stop))
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
        if self.engine_failed:
            # Nothing left to drain: the requests are failing over. Leave discovery now,
            # let their error frames go out, and exit without touching the engine (a hung
            # one may never return from a stop).
            await lease.revoke()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
            await runner.cleanup()
            self.engine.release_files()
            log.error("worker %s exiting: %s", self.id, self.engine_failed)
            return ENGINE_FAILED_EXIT
        log.info("draining: leaving discovery, %d requests in flight", self._calls)
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
        if watch:
            watch.cancel()
        watchdog.cancel()
        await runner.cleanup()
        self.kv.clear()
        await self.router.close()
        await self.session.close()
        await self.engine.stop()
        await self.discovery.close()
        log.info("worker %s stopped", self.id)
        return 0


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


