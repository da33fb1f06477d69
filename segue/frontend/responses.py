"""The Responses API (`/v1/responses`): a response is generated as a chat completion
(api/responses.py builds it) and presented as OpenAI's response object and events
(response_events.py); stored responses live in the response store (response_store.py),
which every frontend naming the same store reads. Background responses, their followers and
their take-over after their frontend died: background.py.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from segue.api import openai as oai
from segue.api import responses as rapi
from segue.frontend.background import Background, Event
from segue.frontend.config import FrontendConfig
from segue.frontend.errors import MigrationError, NoWorkerError, RejectedError
from segue.frontend.generation import Generations, api_error, tool_parser
from segue.frontend.http import read_body
from segue.frontend.metrics import FrontendMetrics
from segue.frontend.models import ModelRegistry
from segue.frontend.preprocess import PreparedRequest, decode_json
from segue.frontend.render import SSE_HEADERS
from segue.frontend.response_events import ResponseEvents, sse
from segue.frontend.response_store import ResponseStore, Status, Stored, StoreError
from segue.log import request_id_var
from segue.protocol import FinishReason

log = logging.getLogger("segue.frontend")

T = TypeVar("T")
_CHAT_PARAMS = {"response_format": "text.format", "max_tokens": "max_output_tokens"}


def _header(body: rapi.ResponsesRequest) -> dict[str, Any]:
    """The request's fields the response object echoes."""
    tools = [msgspec.to_builtins(t) for t in body.tools or []]
    fmt = body.text.format if body.text is not None else None
    return {
        "model": body.model,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tool_choice": body.tool_choice or "auto",
        "tools": tools,
        "text": {"format": msgspec.to_builtins(fmt) if fmt else {"type": "text"}},
        "truncation": "disabled",
        "background": body.background,
        "store": body.store,
        "user": body.user,
    }


class Responses:
    def __init__(
        self,
        cfg: FrontendConfig,
        models: ModelRegistry,
        generations: Generations,
        store: ResponseStore,
        metrics: FrontendMetrics,
    ) -> None:
        self.cfg = cfg
        self.models = models
        self.generations = generations
        self.store = store
        self.metrics = metrics
        self.background = Background(store, metrics, self)

    # -- HTTP ----------------------------------------------------------------------------

    async def handle_create(self, request: web.Request) -> web.StreamResponse:
        try:
            if self.generations.shutting_down:
                raise oai.APIError(503, "frontend is shutting down", code="unavailable")
            raw = await read_body(request, self.cfg)
            body = decode_json(raw, rapi.decoder)
            if body.background and not body.store:
                raise oai.APIError(400, "background responses must be stored", param="store")
            rid = "resp_" + uuid.uuid4().hex
            request_id_var.set(rid)
            conversation = await self._history(body.previous_response_id)
            items = rapi.input_items(body)
            created = int(time.time())
            prep = await self._prepare(body, conversation + items, rid)
            builder = self.builder(prep, _header(body), created)
            if body.store:
                record = {"body": msgspec.json.decode(raw), "conversation": conversation + items}
                await self.store_op(
                    self.store.create(
                        rid,
                        msgspec.json.encode(record),
                        msgspec.json.encode(_with_ids(rid, items)),
                        builder.encoded(),
                        builder.status,
                        body.background,
                        self.background.owner,
                    )
                )
            if body.background:
                prep.state.detach = True  # its worker keeps it if this frontend dies
                running = self.background.own(rid, prep, builder, stored_last=-1)
                if body.stream:
                    events = self.background.follow_local(running, -1)
                    return await self._stream(request, rid, events)
                return _json(builder.response())
            if body.stream:
                gen = self.events(prep, builder)
                resp = await self._stream(request, rid, gen)
            else:
                async with contextlib.aclosing(self.events(prep, builder)) as gen:
                    async for _ in gen:
                        pass
                resp = _json(builder.response())
            if body.store:
                await self.store_op(self.store.finish(rid, builder.encoded(), builder.status))
            return resp
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        try:
            rid = request.match_info["response_id"]
            stored = await self.get(rid)
            q = request.query
            if q.get("stream", "false").lower() != "true":
                if stored.status.running:
                    await self.background.take_over_if_stale(stored)
                    stored = await self.get(rid)
                return web.Response(body=stored.response, content_type="application/json")
            if not stored.background:
                raise oai.APIError(400, "only background responses can be streamed again", "stream")
            after = _starting_after(q.get("starting_after"))
            if not stored.status.running and after > stored.last_seq:
                raise oai.APIError(
                    400,
                    f"starting_after {after} is beyond the last event ({stored.last_seq})",
                    param="starting_after",
                )
            self.metrics.response_resumes.inc()
            log.info("Resumed Response ID: %s after event %d", rid, after)
            return await self._stream(request, rid, self.background.follow(stored, after))
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_cancel(self, request: web.Request) -> web.Response:
        try:
            rid = request.match_info["response_id"]
            stored = await self.get(rid)
            if not stored.background:
                raise oai.APIError(400, "only background responses can be cancelled", "response_id")
            done = await self.store_op(self.store.cancel(rid, _cancelled))
            if done is None:
                raise _not_found(rid)
            self.background.stop(rid)  # at once; elsewhere its owner stops at its next batch
            log.info("Cancelled Response ID: %s", rid)
            return web.Response(body=done.response, content_type="application/json")
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_delete(self, request: web.Request) -> web.Response:
        try:
            rid = request.match_info["response_id"]
            if not await self.store_op(self.store.delete(rid)):
                raise _not_found(rid)
            self.background.stop(rid)
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_input_items(self, request: web.Request) -> web.Response:
        try:
            stored = await self.get(request.match_info["response_id"])
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)
        items = msgspec.json.decode(stored.input_items)
        return web.json_response(
            {
                "object": "list",
                "data": items,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None,
                "has_more": False,
            }
        )

    # -- pieces --------------------------------------------------------------------------

    async def store_op(self, op: Awaitable[T]) -> T:
        try:
            return await op
        except StoreError as e:
            self.metrics.store_errors.inc()
            raise oai.APIError(503, str(e), code="store_unavailable") from None

    async def get(self, rid: str) -> Stored:
        stored = await self.store_op(self.store.get(rid))
        if stored is None:
            raise _not_found(rid)
        return stored

    async def _history(self, previous: str | None) -> list[dict[str, Any]]:
        """The conversation a response continues: its previous response's conversation and
        output, as items."""
        if previous is None:
            return []
        stored = await self.store_op(self.store.get(previous))
        if stored is None:
            raise oai.APIError(
                404, f"No response found with id '{previous}'", param="previous_response_id"
            )
        record = msgspec.json.decode(stored.request)
        output = msgspec.json.decode(stored.response).get("output", [])
        return record["conversation"] + [_as_input(o) for o in output]

    async def _prepare(
        self, body: rapi.ResponsesRequest, conversation: list[dict[str, Any]], rid: str
    ) -> PreparedRequest:
        try:
            chat = rapi.chat_request(body, conversation, rid)
            model = self.models.require(body.model)
            prep = model.preprocess(chat, True, rid)
            await model.check(prep)
        except oai.APIError as e:
            if e.param in _CHAT_PARAMS:
                e.param = _CHAT_PARAMS[e.param]
                e.message = e.message.replace("response_format", "text.format")
            elif e.param is not None and e.param.startswith("messages"):
                e.param = "input"
            raise
        return prep

    def builder(
        self, prep: PreparedRequest, header: dict[str, Any], created: int
    ) -> ResponseEvents:
        tok = self.models.require(prep.state.model).tokenizer
        parser = tool_parser(prep, 0) if prep.tool_parser is not None else None
        return ResponseEvents(prep.request_id, header, created, tok, parser)

    async def events(
        self, prep: PreparedRequest, builder: ResponseEvents
    ) -> AsyncGenerator[list[Event], None]:
        """The response's events, in batches as they are made, to its terminal event (a
        failure to generate is `response.failed`); from its start, or from where a
        builder replayed with the request's earlier tokens (`prep.state.generated`) is."""
        if builder.seq < 0:
            builder.start()
            yield builder.take()
        output = self.models.require(prep.state.model).output
        tokens = self.generations.client.generate(prep.state)
        deltas = output.text_deltas(tokens, [], per_token=True, detok=builder.detok)
        try:
            async with contextlib.aclosing(deltas) as ds:
                async for d in ds:
                    builder.add(d.token_ids, d.text)
                    if d.finish_reason is not None:
                        reason = d.finish_reason
                        if reason is FinishReason.TOOL_CALLS:
                            reason = FinishReason.STOP
                        builder.finish(reason, prep.prompt_len, d.cached_tokens)
                    if builder.emitted:
                        yield builder.take()
        except (oai.APIError, NoWorkerError, MigrationError, RejectedError) as e:
            err = api_error(e)
            builder.fail(str(err.code or "server_error"), err.message)
            yield builder.take()

    async def restart(self, stored: Stored) -> tuple[PreparedRequest, ResponseEvents]:
        """A stored running response, to go on from its stored tokens: the request with
        them as generated (the next worker continues from there, as after a migration),
        and a builder that made its stored events again from them."""
        record = msgspec.json.decode(stored.request)
        body = msgspec.convert(record["body"], rapi.ResponsesRequest)
        created = msgspec.json.decode(stored.response)["created_at"]
        prep = await self._prepare(body, record["conversation"], stored.id)
        builder = self.builder(prep, _header(body), created)
        tokens = msgspec.json.decode(stored.tokens)
        builder.start()
        builder.replay(tokens)
        if builder.seq != stored.last_seq:  # stored in one transaction: a bug if so
            log.error("Response ID: %s: its tokens do not make its events", stored.id)
            return prep, self.builder(prep, _header(body), created)  # from its start
        prep.state.generated = list(tokens)
        prep.state.detach = True
        prep.state.prefer = stored.worker  # it may still run there: attach to it
        return prep, builder

    async def _stream(
        self, request: web.Request, rid: str, events: AsyncGenerator[list[Event], None]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": rid})
        await resp.prepare(request)
        async with contextlib.aclosing(events) as gen:
            async for batch in gen:
                if batch:
                    await resp.write(b"".join(sse(data, kind) for _, kind, data in batch))
        await resp.write_eof()
        return resp


def _json(doc: dict[str, Any]) -> web.Response:
    return web.Response(body=msgspec.json.encode(doc), content_type="application/json")


def _not_found(rid: str) -> oai.APIError:
    return oai.APIError(404, f"No response found with id '{rid}'", param="response_id")


def _starting_after(value: str | None) -> int:
    if value is None:
        return -1
    try:
        n = int(value)
    except ValueError:
        raise oai.APIError(400, "starting_after must be an integer", "starting_after") from None
    if n < -1:
        raise oai.APIError(400, "starting_after must be at least -1", "starting_after")
    return n


def _cancelled(response: bytes) -> bytes:
    doc = msgspec.json.decode(response)
    doc["status"] = Status.CANCELLED.value
    return msgspec.json.encode(doc)


def _with_ids(rid: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as input_items lists them: each with an id (and a message's content as
    parts)."""
    out = []
    for i, item in enumerate(items):
        item = {"type": "message", **item, "id": item.get("id") or f"in_{rid[5:]}_{i}"}
        if item["type"] == "message" and isinstance(item.get("content"), str):
            item["content"] = [{"type": "input_text", "text": item["content"]}]
        out.append(item)
    return out


def _as_input(output: dict[str, Any]) -> dict[str, Any]:
    """An output item of an earlier response as an input item of the next."""
    if output.get("type") == "function_call":
        return {
            "type": "function_call",
            "call_id": output["call_id"],
            "name": output["name"],
            "arguments": output["arguments"],
        }
    text = "".join(p.get("text", "") for p in output.get("content", []))
    return {"type": "message", "role": "assistant", "content": text}
