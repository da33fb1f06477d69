"""The Responses API (`/v1/responses`): a response is generated as a chat completion
(api/responses.py builds it) and presented as OpenAI's response object and events
(response_events.py); stored responses live in the response store (response_store.py),
which every frontend naming the same store reads.

A background response (`background: true`) belongs to the frontend that generates it, not
to a client connection: a client that leaves, or a second client, follows its events with
`GET /v1/responses/{id}?stream=true&starting_after=N` at any frontend. The owner writes its
events to the store in batches (every BATCH_S, and at least every BEAT_S as a heartbeat).
A frontend asked about a running response whose owner has not written for STALE_S (it
died, or let it go at shutdown) takes it over: it claims it in the store and generates it
again from its stored request. The events are a function of the request and its tokens
(the seed is derived from the response id), so the new owner's events equal the first
owner's, number for number; it writes only those after the last stored one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from aiohttp import web

from segue.api import openai as oai
from segue.api import responses as rapi
from segue.frontend.config import FrontendConfig
from segue.frontend.errors import MigrationError, NoWorkerError, RejectedError
from segue.frontend.generation import Generations, api_error, tool_parser
from segue.frontend.http import read_body
from segue.frontend.metrics import FrontendMetrics
from segue.frontend.models import ModelRegistry
from segue.frontend.preprocess import PreparedRequest, decode_json
from segue.frontend.render import SSE_HEADERS
from segue.frontend.response_events import TERMINAL, ResponseEvents, sse
from segue.frontend.response_store import ResponseStore, Status, Stored, StoreError, Write
from segue.log import request_id_var
from segue.protocol import FinishReason

log = logging.getLogger("segue.frontend")

BATCH_S = 0.05  # events wait at most this long before their batch is written
BEAT_S = 0.5  # an owner writes at least this often, events or none
STALE_S = 3.0  # an owner silent this long has died or let go: take the response over
POLL_S = 0.02  # a follower of a response owned elsewhere reads the store this often
_CHAT_PARAMS = {"response_format": "text.format", "max_tokens": "max_output_tokens"}

Event = tuple[int, str, bytes]  # sequence number, type, JSON


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


class Running:
    """A background response this process owns: its events so far, for local followers."""

    def __init__(self, builder: ResponseEvents) -> None:
        self.builder = builder
        self.events: list[Event] = []
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # done, failed, cancelled or let go: followers stop
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def publish(self, events: list[Event], ended: bool = False) -> None:
        self.events += events
        self.ended = self.ended or ended
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    async def changed(self) -> None:
        await asyncio.shield(self._changed)


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
        self.owner = uuid.uuid4().hex  # this process, as the store knows its responses
        self.running: dict[str, Running] = {}

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
            builder = ResponseEvents(rid, _header(body), created)
            if body.store:
                record = {"body": msgspec.json.decode(raw), "conversation": conversation + items}
                await self._store(
                    self.store.create(
                        rid,
                        msgspec.json.encode(record),
                        msgspec.json.encode(_with_ids(rid, items)),
                        builder.encoded(),
                        builder.status,
                        body.background,
                        self.owner,
                    )
                )
            if body.background:
                running = self._own(rid, prep, builder, stored_last=-1)
                if body.stream:
                    return await self._stream(request, rid, self._follow_local(running, -1))
                return _json(builder.response())
            if body.stream:
                gen = self._events(prep, builder)
                resp = await self._stream(request, rid, gen)
            else:
                async with contextlib.aclosing(self._events(prep, builder)) as gen:
                    async for _ in gen:
                        pass
                resp = _json(builder.response())
            if body.store:
                await self._store(self.store.finish(rid, builder.encoded(), builder.status))
            return resp
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        try:
            rid = request.match_info["response_id"]
            stored = await self._get(rid)
            q = request.query
            if q.get("stream", "false").lower() != "true":
                if stored.status.running:
                    await self._take_over_if_stale(stored)
                    stored = await self._get(rid)
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
            return await self._stream(request, rid, self._follow(stored, after))
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_cancel(self, request: web.Request) -> web.Response:
        try:
            rid = request.match_info["response_id"]
            stored = await self._get(rid)
            if not stored.background:
                raise oai.APIError(400, "only background responses can be cancelled", "response_id")
            done = await self._store(self.store.cancel(rid, _cancelled))
            if done is None:
                raise _not_found(rid)
            running = self.running.get(rid)
            if running is not None and running.task is not None:
                running.task.cancel()  # at once; elsewhere its owner stops at its next batch
            log.info("Cancelled Response ID: %s", rid)
            return web.Response(body=done.response, content_type="application/json")
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_delete(self, request: web.Request) -> web.Response:
        try:
            rid = request.match_info["response_id"]
            if not await self._store(self.store.delete(rid)):
                raise _not_found(rid)
            running = self.running.get(rid)
            if running is not None and running.task is not None:
                running.task.cancel()
            return web.json_response({"id": rid, "object": "response", "deleted": True})
        except oai.APIError as e:
            return web.json_response(e.body(), status=e.status, headers=e.headers)

    async def handle_input_items(self, request: web.Request) -> web.Response:
        try:
            stored = await self._get(request.match_info["response_id"])
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

    async def detach_all(self) -> None:
        """At shutdown: let every background response this process owns go, so that a
        client resuming at another frontend has it taken over at once."""
        for rid, running in list(self.running.items()):
            if running.task is not None:
                running.task.cancel()
            running.publish([], ended=True)
            with contextlib.suppress(StoreError):
                await self.store.release(rid, self.owner)
            log.info("Detached Response ID: %s (frontend stopping)", rid)

    # -- pieces --------------------------------------------------------------------------

    async def _store(self, op: Any) -> Any:
        try:
            return await op
        except StoreError as e:
            self.metrics.store_errors.inc()
            raise oai.APIError(503, str(e), code="store_unavailable") from None

    async def _get(self, rid: str) -> Stored:
        stored = await self._store(self.store.get(rid))
        if stored is None:
            raise _not_found(rid)
        return stored

    async def _history(self, previous: str | None) -> list[dict[str, Any]]:
        """The conversation a response continues: its previous response's conversation and
        output, as items."""
        if previous is None:
            return []
        stored = await self._store(self.store.get(previous))
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

    async def _events(
        self, prep: PreparedRequest, builder: ResponseEvents
    ) -> AsyncGenerator[list[Event], None]:
        """The response's events, in batches as they are made, from its start to its
        terminal event (a failure to generate is `response.failed`)."""
        builder.start()
        yield builder.take()
        output = self.models.require(prep.state.model).output
        parser = tool_parser(prep, 0) if prep.tool_parser is not None else None
        made = 0
        try:
            async with contextlib.aclosing(self.generations.choice_deltas(prep, output)) as ds:
                async for _, d in ds:
                    made += len(d.token_ids)
                    text, calls = (d.text, []) if parser is None else parser.feed(d.text)
                    if d.finish_reason is not None and parser is not None:
                        rest, more = parser.finish()
                        text, calls = text + rest, calls + more
                    builder.text(text)
                    builder.calls(calls)
                    if d.finish_reason is not None:
                        reason = d.finish_reason
                        if reason is FinishReason.TOOL_CALLS:
                            reason = FinishReason.STOP
                        builder.finish(reason, prep.prompt_len, made, d.cached_tokens)
                    if builder.emitted:
                        yield builder.take()
        except (oai.APIError, NoWorkerError, MigrationError, RejectedError) as e:
            err = api_error(e)
            builder.fail(str(err.code or "server_error"), err.message)
            yield builder.take()

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

    # -- background responses -------------------------------------------------------------

    def _own(
        self, rid: str, prep: PreparedRequest, builder: ResponseEvents, stored_last: int
    ) -> Running:
        """Generates a background response in this process, whatever its clients do."""
        running = Running(builder)
        self.running[rid] = running
        running.task = asyncio.create_task(self._generate(rid, prep, running, stored_last))
        return running

    async def _generate(
        self, rid: str, prep: PreparedRequest, running: Running, stored_last: int
    ) -> None:
        request_id_var.set(rid)
        writer = asyncio.create_task(self._writer(rid, running, stored_last))
        try:
            async with contextlib.aclosing(self._events(prep, running.builder)) as gen:
                async for batch in gen:
                    running.publish(batch)
            running.publish([], ended=True)
            await writer  # its last batch written
        finally:
            writer.cancel()
            running.publish([], ended=True)
            if self.running.get(rid) is running:
                del self.running[rid]

    async def _writer(self, rid: str, running: Running, stored_last: int) -> None:
        """Writes the owner's events in batches (every BATCH_S at most, at least every
        BEAT_S) until the response ends; stops the generation if the store says the
        response is no longer ours (cancelled, deleted, taken over)."""
        written = stored_last
        builder = running.builder
        while True:
            ended = running.ended
            new = running.events[written + 1 :]
            try:
                result = await self.store.append(
                    rid, self.owner, [(s, d) for s, _, d in new], builder.encoded(),
                    builder.status,
                )  # fmt: skip
            except StoreError as e:  # kept, and written with the next batch
                self.metrics.store_errors.inc()
                log.error("Response ID: %s: %s", rid, e)
            else:
                if new:
                    written = new[-1][0]
                if result is Write.LOST:
                    log.info("Response ID: %s is no longer this frontend's: stopping", rid)
                    if running.task is not None:
                        running.task.cancel()
                    return
                if ended:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BEAT_S):
                    await running.changed()
                    await asyncio.sleep(BATCH_S)  # let a batch gather

    async def _follow_local(
        self, running: Running, after: int
    ) -> AsyncGenerator[list[Event], None]:
        i = after + 1
        while True:
            if i < len(running.events):
                batch = running.events[i:]
                i += len(batch)
                yield batch
                continue
            if running.ended:
                return
            await running.changed()

    async def _follow(self, stored: Stored, after: int) -> AsyncGenerator[list[Event], None]:
        """Events after `after` of a background response, to its end: from this process if
        it owns it, else from the store (taking it over if its owner went silent)."""
        rid = stored.id
        while True:
            running = self.running.get(rid)
            if running is not None:
                async with contextlib.aclosing(self._follow_local(running, after)) as local:
                    async for batch in local:
                        after = batch[-1][0]
                        yield batch
                if running.builder.done or running.builder.status is Status.CANCELLED:
                    return
                stored = await self._get(rid)  # let go, or lost: read on from the store
            rows = await self._store(self.store.events(rid, after))
            if rows:
                batch = [(s, _kind(d), d) for s, d in rows]
                after = rows[-1][0]
                yield batch
                if batch[-1][1] in TERMINAL:
                    return
                continue
            stored = await self._get(rid)
            if not stored.status.running:
                if stored.last_seq <= after:
                    return
                continue
            if not await self._take_over_if_stale(stored):
                await asyncio.sleep(POLL_S)

    async def _take_over_if_stale(self, stored: Stored) -> bool:
        """Claims a running response whose owner went silent and generates it again here;
        True if this process owns it now."""
        if stored.id in self.running:
            return True
        if time.time() - stored.heartbeat < STALE_S:
            return False
        if not await self._store(self.store.claim(stored.id, self.owner, STALE_S)):
            return False
        record = msgspec.json.decode(stored.request)
        body = msgspec.convert(record["body"], rapi.ResponsesRequest)
        old = msgspec.json.decode(stored.response)
        prep = await self._prepare(body, record["conversation"], stored.id)
        builder = ResponseEvents(stored.id, _header(body), old["created_at"])
        self._own(stored.id, prep, builder, stored_last=stored.last_seq)
        self.metrics.response_takeovers.inc()
        log.info("Took over Response ID: %s after event %d", stored.id, stored.last_seq)
        return True


def _kind(data: bytes) -> str:
    return str(msgspec.json.decode(data)["type"])


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
