"""The OpenAI-compatible HTTP frontend.

Preprocessing (chat template + tokenizer) happens here, so the frontend always knows the
token ids of the prompt and of every generated token; that is what makes migration exact.
Text is produced by incremental detokenization with stop strings checked across deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from segue.api import openai as oai
from segue.discovery import Discovery
from segue.frontend.migration import (
    Generation,
    MigrationError,
    Migrator,
    NoWorkerError,
    RejectedError,
)
from segue.log import request_id_var
from segue.router import Router
from segue.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer

log = logging.getLogger("segue.frontend")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


@dataclass
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "segue-mocker"
    router: str = "round-robin"
    migration_limit: int = 3
    stall_timeout: float = 5.0
    request_timeout: float | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    default_max_tokens_chat: int = 1024
    default_max_tokens_completion: int = 16
    shutdown_grace: float = 30.0
    disagg_strategy: str = "none"
    prefill_fallback: str = "none"
    max_connections: int = 1024


class _Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "segue_frontend_requests", "HTTP requests by endpoint and status",
            ["endpoint", "status"], registry=r,
        )
        self.migrations = Counter(
            "segue_frontend_migrations", "Requests re-sent to another worker", ["reason"],
            registry=r,
        )
        self.cancellations = Counter(
            "segue_frontend_cancellations", "Requests cancelled because the client went away",
            registry=r,
        )
        self.inflight = Gauge("segue_frontend_inflight_requests", "Requests in flight",
                              registry=r)
        self.ttft = Histogram(
            "segue_frontend_time_to_first_token_seconds", "Time to first token",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.itl = Histogram(
            "segue_frontend_inter_token_latency_seconds",
            "Time between consecutive token deliveries to the client",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )


class _Prepared:
    """A validated request: what to generate and how to present it."""

    __slots__ = ("gen", "chat", "stream", "include_usage", "stops", "token_ids", "timeout",
                 "prompt_len")

    def __init__(self, gen: Generation, chat: bool, body: oai._Common, stops: list[str],
                 timeout: float | None) -> None:
        self.gen = gen
        self.chat = chat
        self.stream = body.stream
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.stops = stops
        self.token_ids = body.return_token_ids
        self.timeout = timeout
        self.prompt_len = len(gen.prompt_ids)


class Frontend:
    def __init__(self, cfg: FrontendConfig, tokenizer: Tokenizer, discovery: Discovery) -> None:
        self.cfg = cfg
        self.tok = tokenizer
        self.discovery = discovery
        self.metrics = _Metrics()
        self.session: aiohttp.ClientSession | None = None
        self.router: Router | None = None
        self.migrator: Migrator | None = None
        self.shutting_down = False
        self.model_aliases = {cfg.model_name}
        self._watch_task: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, limit_per_host=0, ttl_dns_cache=None,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.router = Router(self.cfg.router, self.session)
        self.migrator = Migrator(
            self.router, self.session, self.metrics.migrations,
            migration_limit=self.cfg.migration_limit, stall_timeout=self.cfg.stall_timeout,
            strategy=self.cfg.disagg_strategy, prefill_fallback=self.cfg.prefill_fallback,
        )
        self._watch_task = asyncio.create_task(self._watch(), name="discovery-watch")

    async def _watch(self) -> None:
        async for instances in self.discovery.watch():
            self.router.update(instances)

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self.router.close()
        await self.session.close()
        await self.discovery.close()

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.cfg.max_body_bytes, middlewares=[self._error_middleware]
        )
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/live", self.handle_live)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            err = oai.APIError(e.status, f"{e.reason}: {request.method} {request.path}")
            return web.json_response(err.body(), status=e.status)

    # -- simple endpoints ----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        data = [{"id": self.cfg.model_name, "object": "model", "created": 0,
                 "owned_by": "segue"}]
        return web.json_response({"object": "list", "data": data})

    async def handle_health(self, request: web.Request) -> web.Response:
        workers = [
            {"id": i.id, "role": i.role, "pid": i.pid, "url": i.url,
             "routable": i.id not in self.router.down}
            for i in self.router.instances.values()
        ]
        ok = bool(self.router.routable()) and not self.shutting_down
        body = {"status": "ok" if ok else "unavailable", "workers": workers}
        return web.json_response(body, status=200 if ok else 503)

    async def handle_live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type="text/plain")

    # -- generation endpoints ------------------------------------------------------------

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        rid = request.headers.get("X-Request-Id", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request_id_var.set(rid)
        headers = {"X-Request-Id": rid}
        status = 200
        self.metrics.inflight.inc()
        try:
            if self.shutting_down:
                raise oai.APIError(503, "frontend is shutting down", code="unavailable")
            prep = self._prepare(await self._read_body(request), chat, rid)
            if prep.stream:
                return await self._stream(request, prep, headers)
            return await self._complete(prep, headers)
        except oai.APIError as e:
            status = e.status
            return web.json_response(e.body(), status=e.status, headers=headers)
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
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise oai.APIError(
                413, f"request body exceeds {self.cfg.max_body_bytes} bytes", code="too_large"
            ) from None

    def _prepare(self, raw: bytes, chat: bool, rid: str) -> _Prepared:
        try:
            body = (oai.chat_decoder if chat else oai.completion_decoder).decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise oai.validation_error(e) from None
        if body.model not in self.model_aliases:
            raise oai.APIError(404, f"The model `{body.model}` does not exist; this server "
                               f"serves `{self.cfg.model_name}`", param="model",
                               code="model_not_found")
        if body.n != 1:
            raise oai.APIError(400, "only n=1 is supported", param="n")
        if body.logprobs not in (None, False):
            raise oai.APIError(400, "logprobs are not supported", param="logprobs")
        if chat:
            text = self.tok.apply_chat_template(oai.message_dicts(body.messages))
            prompt_ids = self.tok.encode(text, add_special_tokens=False)
            max_tokens = body.max_completion_tokens or body.max_tokens
            prompt_param = "messages"
        else:
            if body.echo:
                raise oai.APIError(400, "echo is not supported", param="echo")
            p = oai.prompt_text_or_ids(body.prompt)
            prompt_ids = self.tok.encode(p) if isinstance(p, str) else p
            if isinstance(p, list) and any(t < 0 or t >= self.tok.vocab_size for t in p):
                raise oai.APIError(400, "prompt token id out of range", param="prompt")
            max_tokens = body.max_tokens
            prompt_param = "prompt"
        if not prompt_ids:
            raise oai.APIError(400, "the prompt is empty", param=prompt_param)
        ctx = self.tok.context_length
        if len(prompt_ids) >= ctx:
            raise oai.APIError(
                400, f"the prompt has {len(prompt_ids)} tokens; this model's context length "
                f"is {ctx}", param=prompt_param, code="context_length_exceeded",
            )
        room = ctx - len(prompt_ids)
        if max_tokens is None:
            default = self.cfg.default_max_tokens_chat if chat else \
                self.cfg.default_max_tokens_completion
            max_tokens = min(default, room)
        elif max_tokens > room:
            param = "max_completion_tokens" if chat and body.max_completion_tokens else \
                "max_tokens"
            raise oai.APIError(
                400, f"{param}={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                f"the context length {ctx}", param=param, code="context_length_exceeded",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        # A sampled request gets a fixed seed so that a migrated continuation samples the
        # same way the first worker would have.
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        gen = Generation(
            request_id=rid, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=temperature, top_p=body.top_p or 1.0, seed=seed,
            eos_token_ids=self.tok.eos_token_ids, ignore_eos=body.ignore_eos,
        )
        return _Prepared(gen, chat, body, stops, body.timeout or self.cfg.request_timeout)

    # -- output --------------------------------------------------------------------------

    async def _tokens(self, prep: _Prepared):
        """Yields (text delta, token ids, finish_reason or None) with stop strings applied."""
        detok = IncrementalDetokenizer(self.tok)
        stopper = StopChecker(prep.stops)
        start = last = time.perf_counter()
        first = True
        ttft, itl = self.metrics.ttft, self.metrics.itl
        async with contextlib.aclosing(self.migrator.generate(prep.gen)) as stream:
            async for ids, finish in stream:
                if ids:
                    now = time.perf_counter()
                    if first:
                        ttft.observe(now - start)
                        first = False
                    else:
                        itl.observe(now - last)
                    last = now
                text, hit = stopper.feed(detok.add(ids))
                if hit:
                    yield text, ids, "stop"
                    return
                if finish is not None:
                    text += stopper.feed(detok.flush())[0] + stopper.flush()
                    yield text, ids, finish
                    return
                if text or ids:
                    yield text, ids, None

    async def _with_deadline(self, prep: _Prepared, work):
        if prep.timeout is None:
            return await work
        try:
            async with asyncio.timeout(prep.timeout):
                return await work
        except TimeoutError:
            log.info("Request %s timed out after %.3fs", prep.gen.request_id, prep.timeout)
            raise oai.APIError(408, f"request timed out after {prep.timeout}s",
                               param="timeout", code="timeout") from None

    async def _complete(self, prep: _Prepared, headers: dict) -> web.Response:
        async def collect():
            parts, ids, reason = [], [], None
            async for text, tids, finish in self._tokens(prep):
                parts.append(text)
                ids.extend(tids)
                reason = finish
            return "".join(parts), ids, reason

        try:
            text, _, finish = await self._with_deadline(prep, collect())
        except (NoWorkerError, MigrationError) as e:
            raise oai.APIError(503, f"Service unavailable: {e}", code="unavailable") from None
        except RejectedError as e:
            raise oai.APIError(400, str(e)) from None
        gen = prep.gen
        created = int(time.time())
        if prep.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if prep.token_ids:
            choice["token_ids"] = gen.generated
        body = {
            "id": gen.request_id, "object": obj, "created": created,
            "model": self.cfg.model_name, "choices": [choice],
            "usage": oai.usage(prep.prompt_len, len(gen.generated)),
        }
        return web.Response(body=oai.encode(body), content_type="application/json",
                            headers=headers)

    async def _stream(self, request: web.Request, prep: _Prepared,
                      headers: dict) -> web.StreamResponse:
        gen = prep.gen
        chat = prep.chat
        created = int(time.time())
        model = self.cfg.model_name
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage_null = prep.include_usage
        resp: web.StreamResponse | None = None
        encode = oai.encode

        def chunk(text: str, ids: list[int], finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": text} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if prep.token_ids:
                choice["token_ids"] = ids
            c = {"id": gen.request_id, "object": obj, "created": created, "model": model,
                 "choices": [choice]}
            if usage_null:
                c["usage"] = None
            return b"data: " + encode(c) + b"\n\n"

        async def start() -> web.StreamResponse:
            r = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
            await r.prepare(request)
            if chat:
                await r.write(chunk("", [], None, role=True))
            return r

        async def run() -> None:
            nonlocal resp
            # Headers go out at once (a long prefill must not look like a dead server) when
            # a worker can take the request; with none, the client gets a plain 503.
            if self.migrator.can_route():
                resp = await start()
            tail = b""
            async for text, ids, finish in self._tokens(prep):
                if resp is None:
                    resp = await start()
                if finish is not None:  # the last chunk leaves with the end of the stream
                    tail = chunk(text, ids, finish)
                    break
                await resp.write(chunk(text, ids, finish))
            if resp is None:
                resp = await start()
            if prep.include_usage:
                u = {"id": gen.request_id, "object": obj, "created": created, "model": model,
                     "choices": [], "usage": oai.usage(prep.prompt_len, len(gen.generated))}
                tail += b"data: " + encode(u) + b"\n\n"
            await resp.write_eof(tail + _DONE)  # one write for the end of the stream

        try:
            await self._with_deadline(prep, run())
        except (oai.APIError, NoWorkerError, MigrationError, RejectedError) as e:
            if isinstance(e, oai.APIError):
                err = e
            elif isinstance(e, RejectedError):
                err = oai.APIError(400, str(e))
            else:
                err = oai.APIError(503, f"Service unavailable: {e}", code="unavailable")
            if resp is None:
                raise err from None
            await resp.write_eof(b"data: " + encode(err.body()) + b"\n\n" + _DONE)
        return resp


async def run_frontend(cfg: FrontendConfig, tokenizer: Tokenizer, discovery: Discovery,
                       stop: asyncio.Event) -> None:
    fe = Frontend(cfg, tokenizer, discovery)
    await fe.start()
    runner = web.AppRunner(
        fe.app(), handler_cancellation=True, access_log=None,
        shutdown_timeout=cfg.shutdown_grace,
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"segue frontend ready url=http://{cfg.host}:{port}", flush=True)
    log.info("frontend listening on http://%s:%d", cfg.host, port)
    await stop.wait()
    log.info("frontend stopping: no new connections, finishing streams")
    fe.shutting_down = True
    await runner.cleanup()
    await fe.stop()
