"""The generation endpoints (/v1/completions, /v1/chat/completions): admission, the request
id, the fan-out of the choices, the deadline, and the two writers (a whole JSON answer or
an SSE stream). Every way a request can end becomes a status here (a 4xx `APIError`, 503,
429, 499 for a client that left).

One request passes preprocess.py (body -> RequestState per choice), client.py (attempts on
workers, migration), output.py (text deltas, stop strings) and render.py (response
objects, SSE).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from aiohttp import HttpVersion11, web

from segue import tracing
from segue.api import openai as oai
from segue.frontend.client import ResilientClient
from segue.frontend.config import FrontendConfig
from segue.frontend.errors import MigrationError, NoWorkerError, OverloadedError, RejectedError
from segue.frontend.http import RETRY_AFTER, read_body
from segue.frontend.metrics import FrontendMetrics
from segue.frontend.models import ModelRegistry
from segue.frontend.output import OutputProcessor, TextDelta
from segue.frontend.preprocess import PreparedRequest, decode_body
from segue.frontend.render import SSE_DONE, SSE_HEADERS, ChoiceOutput, Renderer, sse
from segue.frontend.request import RequestState
from segue.frontend.tool_calls import ToolCallParser
from segue.log import request_id_var
from segue.protocol import FinishReason

log = logging.getLogger("segue.frontend")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
T = TypeVar("T")


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


def tool_parser(prep: PreparedRequest, k: int) -> ToolCallParser:
    """Choice k's parser; its call ids are a function of the request id and the choice."""
    assert prep.tool_parser is not None
    tag = hashlib.blake2b(f"{prep.request_id}/{k}".encode(), digest_size=6).hexdigest()
    return ToolCallParser(prep.tool_parser, tag)


def tool_chunks(render: Renderer, parser: ToolCallParser, k: int, text: str, d: TextDelta) -> bytes:
    """A text delta of a choice whose tool calls are parsed: its content, the calls it
    completed, and with the finish `tool_calls` when it made any."""
    content, calls = parser.feed(text)
    finish = d.finish_reason
    if finish is not None:
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
        if parser.calls and finish is FinishReason.STOP:
            finish = FinishReason.TOOL_CALLS
    out = b""
    if content or d.token_ids or (finish is not None and not calls):
        plain = finish if not calls else None
        out += render.chunk(k, content, dataclasses.replace(d, finish_reason=plain))
    out += render.tool_call_chunks(k, calls)
    if calls and finish is not None:
        out += render.finish_chunk(k, finish)
    return out


class Generations:
    """Serves the generation endpoints of one frontend process."""

    def __init__(
        self,
        cfg: FrontendConfig,
        models: ModelRegistry,
        client: ResilientClient,
        metrics: FrontendMetrics,
    ) -> None:
        self.cfg = cfg
        self.models = models
        self.client = client
        self.metrics = metrics
        self.shutting_down = False
        self._inflight = 0

    async def serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        rid = request.headers.get("X-Request-Id", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request_id_var.set(rid)
        headers = {"X-Request-Id": rid}
        status = 200
        span = prep = None
        if tracing.tracer is not None:  # the client's trace context, if it sent one
            span = tracing.start(
                "segue.request",
                request.headers,
                {"gen_ai.request.id": rid, "segue.endpoint": endpoint},
                server=True,
            )
            tracing.current.set(span)
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
            body = decode_body(await read_body(request, self.cfg), chat)
            model = self.models.require(body.model)
            prep = model.preprocess(body, chat, rid)
            await model.check(prep)
            if span is not None:
                _trace(span, prep)
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
            if span is not None:
                span.add_event("cancelled", {"reason": "the client went away"})
            if isinstance(e, asyncio.CancelledError):
                raise
            raise asyncio.CancelledError() from e
        finally:
            self._inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            if span is not None:
                _end(span, prep, status)

    def _text_deltas(
        self, prep: PreparedRequest, output: OutputProcessor, state: RequestState
    ) -> AsyncGenerator[TextDelta, None]:
        return output.text_deltas(self.client.generate(state), prep.stops)

    async def choice_deltas(
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
        async def collect() -> list[ChoiceOutput]:
            outputs = [ChoiceOutput() for _ in prep.states]
            async with contextlib.aclosing(self.choice_deltas(prep, output)) as deltas:
                async for k, d in deltas:
                    outputs[k].add(d)
            return outputs

        try:
            outputs = await self._with_deadline(prep, collect())
        except (NoWorkerError, MigrationError, RejectedError) as e:
            raise api_error(e) from None
        if prep.tool_parser is not None:
            for k, out in enumerate(outputs):
                parser = tool_parser(prep, k)
                content, calls = parser.feed(out.text)
                rest, more = parser.finish()
                out.content, out.tool_calls = content + rest, calls + more
                if out.tool_calls and out.finish_reason is FinishReason.STOP:
                    out.finish_reason = FinishReason.TOOL_CALLS
        body = Renderer(prep, prep.state.model, output.tok).response(outputs)
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
        # HTTP/1.1: each token's event goes straight to the socket as one chunk of the
        # chunked body (aiohttp's write costs a coroutine and two copies an event)
        direct = transport is not None and request.version >= HttpVersion11

        def send(data: bytes) -> None:
            assert transport is not None
            if transport.is_closing():
                raise ConnectionResetError("the client went away")
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))

        async def start() -> web.StreamResponse:
            r = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            if direct:
                r.enable_chunked_encoding()  # the framing `send` writes
            await r.prepare(request)
            if transport is not None:  # writes must not wait on a reader: we watch the buffer
                transport.set_write_buffer_limits(high=2 * bound)
            if prep.chat:
                await r.write(b"".join(render.role_chunk(k) for k in choices))
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
            parsers = (
                [tool_parser(prep, k) for k in choices] if prep.tool_parser is not None else None
            )
            async with contextlib.aclosing(self.choice_deltas(prep, output)) as deltas:
                async for k, d in deltas:
                    if resp is None:
                        resp = await start()
                    text = echo.pop(k) + d.text if echo and k in echo else d.text
                    if d.finish_reason is not None:
                        running -= 1
                        if parsers is not None:
                            chunk = tool_chunks(render, parsers[k], k, text, d)
                        else:
                            chunk = render.chunk(k, text, d)
                        if not running:  # the last chunk leaves with the stream's end
                            tail = chunk
                            break
                        await resp.write(chunk)
                        continue
                    if transport is not None and transport.get_write_buffer_size() > bound:
                        log.info("client of %s not reading: cancelling", prep.request_id)
                        transport.abort()
                        raise ConnectionResetError("the client stopped reading")
                    if parsers is not None:
                        chunk = tool_chunks(render, parsers[k], k, text, d)
                        if chunk:
                            await resp.write(chunk)
                        continue
                    if direct:
                        send(render.chunk(k, text, d))
                    else:
                        await resp.write(render.chunk(k, text, d))
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


def _trace(span: Any, prep: PreparedRequest) -> None:
    """The request's attributes (vLLM's gen_ai names), and its choices traced under it."""
    sp = prep.state.sampling
    span.set_attributes(
        {
            "gen_ai.request.model": prep.state.model,
            "gen_ai.request.max_tokens": prep.state.max_tokens,
            "gen_ai.request.temperature": sp.temperature,
            "gen_ai.request.top_p": sp.top_p,
            "gen_ai.request.n": len(prep.states),
            "gen_ai.usage.prompt_tokens": len(prep.state.prompt_ids),
        }
    )
    for state in prep.states:
        state.trace = tracing.RequestTrace(span)


def _end(span: Any, prep: PreparedRequest | None, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if prep is not None:
        span.set_attribute(
            "gen_ai.usage.completion_tokens", sum(len(s.generated) for s in prep.states)
        )
        span.set_attribute("segue.migrations", sum(s.migrations for s in prep.states))
    if status >= 400:
        tracing.fail(span, "cancelled" if status == 499 else f"HTTP {status}")
    span.end()
