"""The OpenAI-compatible HTTP frontend: routes, lifecycle, metrics.

One request passes preprocess.py (body -> RequestState), client.py (attempts on workers,
migration), output.py (text deltas, stop strings) and render.py (response objects, SSE).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import aiohttp
from aiohttp import web

from segue.api import openai as oai
from segue.auth import client_headers, load_cluster_token
from segue.discovery import Discovery
from segue.frontend.client import (
    MigrationError,
    NoWorkerError,
    OverloadedError,
    RejectedError,
    ResilientClient,
)
from segue.frontend.config import FrontendConfig
from segue.frontend.connections import ConnectionGuard, GuardedRunner
from segue.frontend.keys import ApiKeys
from segue.frontend.metrics import FrontendMetrics
from segue.frontend.models import ModelRegistry, ServedModel
from segue.frontend.openapi import openapi_document
from segue.frontend.output import OutputProcessor, TextDelta
from segue.frontend.preprocess import PreparedRequest, RequestState, decode_body, decode_json
from segue.frontend.render import SSE_DONE, SSE_HEADERS, Renderer, sse
from segue.frontend.system import PUBLISH_S, SystemServer
from segue.log import request_id_var
from segue.protocol import FinishReason
from segue.router import Router
from segue.tokenizer import Tokenizer
from segue.transport import RequestPlane

log = logging.getLogger("segue.frontend")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
T = TypeVar("T")


class Path:
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"
    MODELS = "/v1/models"
    HEALTH = "/health"
    LIVE = "/live"
    METRICS = "/metrics"
    OPENAPI = "/openapi.json"
    TOKENIZE = "/tokenize"
    DETOKENIZE = "/detokenize"


def api_error(e: Exception) -> oai.APIError:
    """The client-visible error for a request that could not be served."""
    if isinstance(e, oai.APIError):
        return e
    if isinstance(e, RejectedError):
        return oai.APIError(400, str(e))
    if isinstance(e, OverloadedError):
        return oai.APIError(
            429, f"Overloaded: {e}", code="overloaded", headers={"Retry-After": RETRY_AFTER}
        )
    return oai.APIError(503, f"Service unavailable: {e}", code="unavailable")


RETRY_AFTER = "1"  # seconds: admission limits free up as requests finish
_OPEN_PATHS = frozenset({Path.HEALTH, Path.LIVE, Path.OPENAPI})


class Frontend:
    """Complete after construction (it makes its HTTP session, so build it inside the
    event loop); `watch_discovery` keeps the router's view current; `close` ends it."""

    def __init__(self, cfg: FrontendConfig, tokenizer: Tokenizer, discovery: Discovery) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.discovery = discovery
        self.metrics = FrontendMetrics()
        self.models = ModelRegistry(
            cfg, tokenizer, OutputProcessor(tokenizer, self.metrics.ttft, self.metrics.itl)
        )
        connector = aiohttp.TCPConnector(
            limit=cfg.max_connections,
            limit_per_host=0,
            ttl_dns_cache=None,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            headers=client_headers(load_cluster_token(cfg.cluster_token_file)),
        )
        self.router = Router(cfg.router, self.session, cfg.kv_overlap_weight, cfg.kv_load_weight)
        self.plane = RequestPlane(self.session, cfg.request_plane, cfg.stall_timeout)
        self.client = ResilientClient(
            self.router,
            self.plane,
            self.metrics.migrations,
            self.metrics.kv_move_fallbacks,
            migration_limit=cfg.migration_limit,
            stall_timeout=cfg.stall_timeout,
            strategy=cfg.disagg_strategy,
            prefill_fallback=cfg.prefill_fallback,
        )
        self.shutting_down = False
        self.guard: ConnectionGuard | None = None  # set once the runner has made it
        self.keys = ApiKeys(cfg.api_key_file) if cfg.api_key_file else None
        self._inflight = 0
        self._openapi = openapi_document()
        self._watch_task = asyncio.create_task(self._watch(), name="discovery-watch")

    async def _watch(self) -> None:
        async for instances in self.discovery.watch():
            self.router.update(self.models.accept(instances))

    async def close(self) -> None:
        self._watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch_task
        await self.router.close()
        await self.plane.close()
        await self.session.close()
        await self.discovery.close()

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.cfg.max_body_bytes,
            middlewares=[self._track_heads, self._error_middleware, self._require_key],
        )
        app.router.add_post(Path.COMPLETIONS, self.handle_completions)
        app.router.add_post(Path.CHAT, self.handle_chat)
        app.router.add_get(Path.MODELS, self.handle_models)
        app.router.add_get(Path.HEALTH, self.handle_health)
        app.router.add_get(Path.LIVE, self.handle_live)
        app.router.add_get(Path.METRICS, self.handle_metrics)
        app.router.add_get(Path.OPENAPI, self.handle_openapi)
        app.router.add_post(Path.TOKENIZE, self.handle_tokenize)
        app.router.add_post(Path.DETOKENIZE, self.handle_detokenize)
        return app

    @web.middleware
    async def _track_heads(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Tells the connection guard a request's head arrived, and when it is answered."""
        guard = self.guard
        if guard is None:
            return await handler(request)
        guard.head_received(request.protocol)
        try:
            return await handler(request)
        finally:
            guard.response_done(request.protocol)

    @web.middleware
    async def _error_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = oai.APIError(e.status, f"{e.reason}: {request.method} {request.path}")
            return web.json_response(err.body(), status=e.status)

    @web.middleware
    async def _require_key(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """With --api-key-file, everything but probes (and /metrics, unless protected)
        needs a valid `Authorization: Bearer` key."""
        keys = self.keys
        if (
            keys is None
            or request.path in _OPEN_PATHS
            or (request.path == Path.METRICS and not self.cfg.protect_metrics)
            or keys.allows(request.headers.get("Authorization"))
        ):
            return await handler(request)
        err = oai.APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
        )
        return web.json_response(err.body(), status=401)

    # -- simple endpoints ----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        # The frontend's own model, and every model a worker in view serves.
        names = dict.fromkeys([self.cfg.served_model_name])
        names.update(dict.fromkeys(i.card.name for i in self.router.instances.values()))
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "segue"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def handle_health(self, request: web.Request) -> web.Response:
        body, ok = self.health()
        return web.json_response(body, status=200 if ok else 503)

    def health(self) -> tuple[dict, bool]:
        """/health's body, and whether a request could be routed now."""
        indexed = self.router.kv_index.workers
        workers = [
            {
                "id": i.id,
                "role": i.role,
                "pid": i.pid,
                "url": i.url,
                "model": i.card.name,
                "routable": i.id not in self.router.down,
                # blocks of its prefix cache in this frontend's KV index (--router kv)
                "kv_blocks": len(indexed[i.id].blocks) if i.id in indexed else None,
            }
            for i in self.router.instances.values()
        ]
        ok = bool(self.router.routable()) and not self.shutting_down
        return {"status": "ok" if ok else "unavailable", "workers": workers}, ok

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise oai.APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                + ", ".join(f"`{n}`" for n in self.models.models),
                param="model",
                code="model_not_found",
            )
        return model

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: token ids of a prompt, or of messages through the template."""
        try:
            body = decode_json(await self._read_body(request), oai.tokenize_decoder)
            tok = self._model(body.model).tokenizer
            if (body.prompt is None) == (body.messages is None):
                raise oai.APIError(400, "give either prompt or messages", param="prompt")
            if body.messages is not None:
                text = tok.apply_chat_template(
                    oai.message_dicts(body.messages),
                    add_generation_prompt=body.add_generation_prompt,
                )
                ids = tok.encode(text, add_special_tokens=False)
            else:
                ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status)
        return web.json_response(
            {"count": len(ids), "max_model_len": tok.context_length, "tokens": ids}
        )

    async def handle_detokenize(self, request: web.Request) -> web.Response:
        try:
            body = decode_json(await self._read_body(request), oai.detokenize_decoder)
            tok = self._model(body.model).tokenizer
            if any(t >= tok.vocab_size for t in body.tokens):
                raise oai.APIError(400, "token id out of range", param="tokens")
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status)
        return web.json_response({"prompt": tok.decode(body.tokens)})

    async def handle_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)

    async def handle_live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), content_type="text/plain")

    # -- generation endpoints ------------------------------------------------------------

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.serve_generation(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve_generation(request, chat=True)

    async def serve_generation(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        rid = request.headers.get("X-Request-Id", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request_id_var.set(rid)
        headers = {"X-Request-Id": rid}
        status = 200
        self.metrics.inflight.inc()
        self._inflight += 1
        try:
            if self.shutting_down:
                raise oai.APIError(503, "frontend is shutting down", code="unavailable")
            if self.cfg.max_inflight and self._inflight > self.cfg.max_inflight:
                self.metrics.rejections.labels(reason="max_inflight").inc()
                raise oai.APIError(
                    503,
                    f"this frontend serves {self.cfg.max_inflight} requests at once "
                    "(--max-inflight); retry shortly",
                    code="unavailable",
                    headers={"Retry-After": RETRY_AFTER},
                )
            body = decode_body(await self._read_body(request), chat)
            model = self._model(body.model)
            prep = model.preprocess(body, chat, rid)
            if prep.stream:
                return await self._respond_stream(request, prep, model.output, headers)
            return await self._respond_whole(prep, model.output, headers)
        except oai.APIError as e:
            status = e.status
            if status == 429:
                self.metrics.rejections.labels(reason="overloaded").inc()
            return web.json_response(e.body(), status=e.status, headers={**headers, **e.headers})
        except (asyncio.CancelledError, ConnectionResetError) as e:
            # The client went away: noticed while waiting (the handler is cancelled) or
            # while writing to it (the write fails).
            status = 499
            if not self.shutting_down:
                self.metrics.cancellations.inc()
                log.info("Cancelled Request ID: %s", rid)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise asyncio.CancelledError() from e
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            async with asyncio.timeout(self.cfg.body_timeout):
                return await request.read()
        except TimeoutError:
            raise oai.APIError(
                408, f"request body not received within {self.cfg.body_timeout}s", code="timeout"
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise oai.APIError(
                413, f"request body exceeds {self.cfg.max_body_bytes} bytes", code="too_large"
            ) from None

    def _text_deltas(
        self, prep: PreparedRequest, output: OutputProcessor, state: RequestState
    ) -> AsyncGenerator[TextDelta, None]:
        return output.text_deltas(self.client.generate(state), prep.stops)

    async def _choice_deltas(
        self, prep: PreparedRequest, output: OutputProcessor
    ) -> AsyncGenerator[tuple[int, TextDelta], None]:
        """Every choice's text deltas as (choice index, delta), as they come. Choices run
        concurrently, each its own request to the workers; one failing fails the request,
        and closing this generator (the client left) cancels them all."""
        if len(prep.states) == 1:
            async with contextlib.aclosing(self._text_deltas(prep, output, prep.state)) as one:
                async for d in one:
                    yield 0, d
            return
        queue: asyncio.Queue[tuple[int, TextDelta | None, Exception | None]] = asyncio.Queue()

        async def pump(k: int, state: RequestState) -> None:
            try:
                async with contextlib.aclosing(self._text_deltas(prep, output, state)) as ds:
                    async for delta in ds:
                        queue.put_nowait((k, delta, None))
                queue.put_nowait((k, None, None))  # this choice is done
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((k, None, e))

        tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(prep.states)]
        try:
            left = len(tasks)
            while left:
                k, got, err = await queue.get()
                if err is not None:
                    raise err
                if got is None:
                    left -= 1
                else:
                    yield k, got
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _with_deadline(self, prep: PreparedRequest, work: Awaitable[T]) -> T:
        if prep.timeout is None:
            return await work
        try:
            async with asyncio.timeout(prep.timeout):
                return await work
        except TimeoutError:
            log.info("Request %s timed out after %.3fs", prep.request_id, prep.timeout)
            raise oai.APIError(
                408, f"request timed out after {prep.timeout}s", param="timeout", code="timeout"
            ) from None

    async def _respond_whole(
        self, prep: PreparedRequest, output: OutputProcessor, headers: dict[str, str]
    ) -> web.Response:
        async def collect() -> list[tuple[str, FinishReason | None]]:
            parts: list[list[str]] = [[] for _ in prep.states]
            reasons: list[FinishReason | None] = [None] * len(prep.states)
            async with contextlib.aclosing(self._choice_deltas(prep, output)) as deltas:
                async for k, d in deltas:
                    parts[k].append(d.text)
                    reasons[k] = d.finish_reason
            return [("".join(p), r) for p, r in zip(parts, reasons, strict=True)]

        try:
            results = await self._with_deadline(prep, collect())
        except (NoWorkerError, MigrationError, RejectedError) as e:
            raise api_error(e) from None
        body = Renderer(prep, prep.state.model, output.tok).response(results)
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _respond_stream(
        self,
        request: web.Request,
        prep: PreparedRequest,
        output: OutputProcessor,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        render = Renderer(prep, prep.state.model, output.tok)
        resp: web.StreamResponse | None = None
        choices = range(len(prep.states))

        transport = request.transport
        bound = self.cfg.max_client_buffer

        async def start() -> web.StreamResponse:
            r = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await r.prepare(request)
            if transport is not None:  # writes must not wait on a reader: we watch the buffer
                transport.set_write_buffer_limits(high=2 * bound)
            if prep.chat:
                await r.write(b"".join(render.chunk(k, "", [], None, role=True) for k in choices))
            return r

        async def run() -> None:
            nonlocal resp
            # Headers go out at once (a long prefill must not look like a dead server) when
            # a worker can take the request; with none, the client gets a plain 503.
            if self.client.can_route(prep.state.model):
                resp = await start()
            tail = b""
            running = len(choices)
            echo = dict(enumerate(prep.echo))  # each choice's echo goes with its first text
            async with contextlib.aclosing(self._choice_deltas(prep, output)) as deltas:
                async for k, d in deltas:
                    if resp is None:
                        resp = await start()
                    text = echo.pop(k) + d.text if echo and k in echo else d.text
                    if d.finish_reason is not None:
                        running -= 1
                        chunk = render.chunk(k, text, d.token_ids, d.finish_reason, start=d.start)
                        if not running:  # the last chunk leaves with the stream's end
                            tail = chunk
                            break
                        await resp.write(chunk)
                        continue
                    if transport is not None and transport.get_write_buffer_size() > bound:
                        log.info("client of %s not reading: cancelling", prep.request_id)
                        transport.abort()
                        raise ConnectionResetError("the client stopped reading")
                    await resp.write(render.chunk(k, text, d.token_ids, None, start=d.start))
            if resp is None:
                resp = await start()
            if prep.include_usage:
                tail += render.usage_chunk()
            await resp.write_eof(tail + SSE_DONE)  # one write for the end of the stream

        try:
            await self._with_deadline(prep, run())
        except (oai.APIError, NoWorkerError, MigrationError, RejectedError) as e:
            err = api_error(e)
            if resp is None:
                raise err from None
            await resp.write_eof(sse(err.body()) + SSE_DONE)
        assert resp is not None
        return resp


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
    await runner.cleanup()
    if system is not None and publisher is not None:
        publisher.cancel()
        await asyncio.to_thread(system.stop)
    await fe.close()


async def _publish_health(fe: Frontend, system: SystemServer) -> None:
    """The system port's view of /health, refreshed; its age is the loop's liveness."""
    while True:
        body, ok = fe.health()
        system.publish(json.dumps(body).encode(), ok)
        await asyncio.sleep(PUBLISH_S)
