"""The OpenAI-compatible HTTP frontend of one process: its parts (router, request plane,
resilient client, served models) and its routes; the generation endpoints are
generation.py's, the middlewares http.py's, the process around it server.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import aiohttp
from aiohttp import web

from segue import health
from segue.api import openai as oai
from segue.auth import client_headers, load_cluster_token
from segue.discovery import Discovery
from segue.frontend.client import ResilientClient
from segue.frontend.config import FrontendConfig
from segue.frontend.connections import ConnectionGuard
from segue.frontend.generation import Generations
from segue.frontend.http import Path, error_bodies, read_body, require_key, track_heads
from segue.frontend.keys import ApiKeys
from segue.frontend.metrics import FrontendMetrics
from segue.frontend.models import ModelRegistry
from segue.frontend.openapi import openapi_document
from segue.frontend.output import OutputProcessor
from segue.frontend.preprocess import decode_json
from segue.frontend.responses import Responses
from segue.frontend.stores import open_store
from segue.router import Router
from segue.tokenizer import Tokenizer
from segue.transport import RequestPlane

log = logging.getLogger("segue.frontend")


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
        self.router.on_change = self._count_routable
        self._routable_seen: set[tuple[str, str]] = set()
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
        self.generations = Generations(cfg, self.models, self.client, self.metrics)
        self.store = open_store(cfg.store, cfg.store_ttl)
        self.responses = Responses(cfg, self.models, self.generations, self.store, self.metrics)
        self.guard: ConnectionGuard | None = None  # set once the runner has made it
        self.keys = ApiKeys(cfg.api_key_file) if cfg.api_key_file else None
        self._openapi = openapi_document()
        self._watch_task = asyncio.create_task(self._watch(), name="discovery-watch")

    @property
    def shutting_down(self) -> bool:
        return self.generations.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.generations.shutting_down = value

    async def _watch(self) -> None:
        async for instances in self.discovery.watch():
            self.router.update(self.models.accept(instances))

    async def close(self) -> None:
        self._watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch_task
        await self.store.close()
        await self.router.close()
        await self.plane.close()
        await self.session.close()
        await self.discovery.close()

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.cfg.max_body_bytes,
            middlewares=[
                track_heads(lambda: self.guard),
                error_bodies,
                require_key(self.keys, self.cfg.protect_metrics),
            ],
        )
        app.router.add_post(Path.COMPLETIONS, self.handle_completions)
        app.router.add_post(Path.CHAT, self.handle_chat)
        r = self.responses
        app.router.add_post(Path.RESPONSES, r.handle_create)
        app.router.add_get(Path.RESPONSE, r.handle_get)
        app.router.add_delete(Path.RESPONSE, r.handle_delete)
        app.router.add_post(Path.RESPONSE_CANCEL, r.handle_cancel)
        app.router.add_get(Path.RESPONSE_INPUT_ITEMS, r.handle_input_items)
        app.router.add_get(Path.MODELS, self.handle_models)
        app.router.add_get(Path.HEALTH, self.handle_health)
        app.router.add_get(Path.LIVE, self.handle_live)
        app.router.add_get(Path.METRICS, self.handle_metrics)
        app.router.add_get(Path.OPENAPI, self.handle_openapi)
        app.router.add_post(Path.TOKENIZE, self.handle_tokenize)
        app.router.add_post(Path.DETOKENIZE, self.handle_detokenize)
        return app

    # -- simple endpoints ----------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        # The frontend's own model, and every model a worker in view serves.
        names = dict.fromkeys([self.cfg.served_model_name])
        names.update(dict.fromkeys(i.card.name for i in self.router.instances.values()))
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "segue"} for n in names]
        return web.json_response({"object": "list", "data": data})

    async def handle_health(self, request: web.Request) -> web.Response:
        body, ok = self.health()
        return web.Response(
            body=health.encode(body), status=200 if ok else 503, content_type="application/json"
        )

    def _count_routable(self) -> None:
        """segue_frontend_routable_workers{model, role}; a pair that had workers and has
        none left reads 0 (what the alert on it watches)."""
        counts = Counter((i.card.name, i.role.value) for i in self.router.routable())
        for key in self._routable_seen - counts.keys():
            self.metrics.routable_workers.labels(*key).set(0)
        for key, n in counts.items():
            self.metrics.routable_workers.labels(*key).set(n)
        self._routable_seen |= counts.keys()

    def health(self) -> tuple[health.FrontendHealth, bool]:
        """/health's body, and whether a request could be routed now."""
        indexed = self.router.kv_index.workers
        workers = [
            health.WorkerEntry(
                i.id,
                i.role,
                i.pid,
                i.url,
                i.card.name,
                i.id not in self.router.down,
                len(indexed[i.id].blocks) if i.id in indexed else None,
            )
            for i in self.router.instances.values()
        ]
        ok = bool(self.router.routable()) and not self.shutting_down
        status = health.FrontendStatus.OK if ok else health.FrontendStatus.UNAVAILABLE
        return health.FrontendHealth(status, workers), ok

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: token ids of a prompt, or of messages through the template."""
        try:
            body = decode_json(await read_body(request, self.cfg), oai.tokenize_decoder)
            tok = self.models.require(body.model).tokenizer
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
            body = decode_json(await read_body(request, self.cfg), oai.detokenize_decoder)
            tok = self.models.require(body.model).tokenizer
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
        return await self.generations.serve(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self.generations.serve(request, chat=True)
