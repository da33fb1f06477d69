"""The frontend's HTTP plumbing around its endpoints: the paths, the middlewares (the
connection guard's bookkeeping, JSON error bodies for aiohttp's own errors, API keys) and
reading a request body within its limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from segue.api import openai as oai
from segue.frontend.config import FrontendConfig
from segue.frontend.connections import ConnectionGuard
from segue.frontend.keys import ApiKeys

RETRY_AFTER = "1"  # seconds: admission limits free up as requests finish


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
    RESPONSES = "/v1/responses"
    RESPONSE = "/v1/responses/{response_id}"
    RESPONSE_CANCEL = "/v1/responses/{response_id}/cancel"
    RESPONSE_INPUT_ITEMS = "/v1/responses/{response_id}/input_items"


_OPEN_PATHS = frozenset({Path.HEALTH, Path.LIVE, Path.OPENAPI})


def track_heads(guard: Callable[[], ConnectionGuard | None]) -> Middleware:
    """Tells the connection guard (once the runner has made it) a request's head arrived,
    and when it is answered."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        g = guard()
        if g is None:
            return await handler(request)
        g.head_received(request.protocol)
        try:
            return await handler(request)
        finally:
            g.response_done(request.protocol)

    return middleware


@web.middleware
async def error_bodies(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, ...) with an OpenAI error body."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = oai.APIError(e.status, f"{e.reason}: {request.method} {request.path}")
        return web.json_response(err.body(), status=e.status)


def require_key(keys: ApiKeys | None, protect_metrics: bool) -> Middleware:
    """With --api-key-file, everything but probes (and /metrics, unless protected) needs a
    valid `Authorization: Bearer` key."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            keys is None
            or request.path in _OPEN_PATHS
            or (request.path == Path.METRICS and not protect_metrics)
            or keys.allows(request.headers.get("Authorization"))
        ):
            return await handler(request)
        err = oai.APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`",
            code="invalid_api_key",
        )
        return web.json_response(err.body(), status=401)

    return middleware


async def read_body(request: web.Request, cfg: FrontendConfig) -> bytes:
    """The body, or a 408 (not received within --body-timeout) or 413 (too large)."""
    try:
        async with asyncio.timeout(cfg.body_timeout):
            return await request.read()
    except TimeoutError:
        raise oai.APIError(
            408, f"request body not received within {cfg.body_timeout}s", code="timeout"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise oai.APIError(
            413, f"request body exceeds {cfg.max_body_bytes} bytes", code="too_large"
        ) from None
