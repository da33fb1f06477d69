"""Engine sessions: one engine request per call, its output streamed to the caller as
frames, with keep-alives while the engine is busy, and the abort when the caller leaves.

A call that may be re-attached (`EngineRequest.detach`: a background response) whose
caller's connection broke is detached instead of aborted: the engine goes on, for
`detach_grace` seconds, and a call for the same request id whose context is the request's
prompt and a prefix of its output attaches to it (it gets the tokens it lacks, then the
rest as they come) instead of starting it again.

A session ends with a final frame (Final, HandBack when the worker hands it back, Error when
the engine failed it), or, for a PREFILL, with the key of the KV the engine now holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from segue import tracing
from segue.engines.base import (
    ConstraintRejected,
    Engine,
    EngineFinish,
    EngineInput,
    EngineRequestError,
    EngineTask,
    RequestStream,
)
from segue.protocol import (
    EngineRequest,
    Error,
    ErrorCode,
    Final,
    FinishReason,
    HandBack,
    KeepAlive,
    Tokens,
    encode_frame,
)
from segue.worker.kv_store import KvStore
from segue.worker.metrics import WorkerMetrics
from segue.worker.sink import DirectTokens, FrameSink, StageError

log = logging.getLogger("segue.worker")
KEEPALIVE_FRAME = encode_frame(KeepAlive())
RELEASE_S = 2.0  # how long a call waits for an older call of its request to let go
T = TypeVar("T")


async def with_keepalive(interval: float, resp: FrameSink, work: Awaitable[T]) -> T:
    """Await `work`, sending keep-alive frames meanwhile so the caller's stall timer does
    not fire on slow but live work (a KV transfer, a grammar's first compile)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            await resp.write(KEEPALIVE_FRAME)
    finally:
        task.cancel()


class EngineFailure(Enum):
    """Why a worker's engine is gone for good (engine monitor)."""

    DEAD = "engine_dead"
    HUNG = "engine_hung"


@dataclass
class Detached:
    """A request whose caller's connection broke, running on for someone to attach."""

    stream: RequestStream
    known: list[int]  # its context and every token its stream gave (sent or not)
    shift: int  # the client's offset of known[i] is i + shift
    timer: asyncio.TimerHandle
    since: float


class EngineSessions:
    """The engine requests this worker is running, by request id."""

    def __init__(
        self,
        engine: Engine,
        metrics: WorkerMetrics,
        kv: KvStore,
        keepalive: float,
        exit_after_tokens: int | None = None,
        detach_grace: float = 0.0,
    ) -> None:
        self.engine = engine
        self.detach_grace = detach_grace
        self.detached: dict[str, Detached] = {}
        self.metrics = metrics
        self.kv = kv
        self.keepalive = keepalive
        self.exit_after_tokens = exit_after_tokens  # fault injection (tests)
        self.active: dict[str, RequestStream] = {}
        self.progress = time.monotonic()  # last output of the engine, or start of its work
        self.failure: EngineFailure | None = None
        self.giving_back: set[str] = set()  # moved without their KV: aborted, not cancelled

    def hand_back_all(self) -> int:
        """Drain deadline: give every request back, live (with its KV) where the engine can
        export it; each caller gets a HandBack frame. Detached ones have nobody to tell."""
        for rid in list(self.detached):
            self._expire(rid, "the worker is draining")
        return len(self.move(list(self.active)))

    def move(self, request_ids: list[str], live: bool = True) -> list[str]:
        """Gives these running requests back to their callers: with the KV of their context
        where the engine can export it (the next worker decodes on), else without (it
        recomputes). Requests that are not running here are skipped."""
        moved = []
        for rid in request_ids:
            if rid not in self.active:
                continue
            if not (live and self.engine.export(rid)):
                self.giving_back.add(rid)
                if not self.engine.abort(rid):  # it finished meanwhile: nothing to give
                    self.giving_back.discard(rid)
                    continue
            moved.append(rid)
        return moved

    def fail_all(self, why: str) -> None:
        """The engine hung: end every request with a retryable error."""
        for stream in list(self.active.values()):
            stream.finish(EngineFinish.ERROR, why)

    async def run(
        self,
        req: EngineRequest,
        resp: FrameSink,
        task: EngineTask,
        kv_payload: bytes | None = None,
    ) -> str | None:
        """Runs the request in the engine, streaming Tokens/KeepAlive frames to the caller.
        Returns the KV key of a finished PREFILL; writes the final frame of anything else."""
        rid = req.request_id
        if req.detach and rid in self.active:
            await self._released(rid)
        attached = self._attach(req, task)
        if attached is not None:
            stream, backlog = attached
            offset = req.start_offset + len(backlog)
            if backlog:
                await resp.write(encode_frame(Tokens(req.start_offset, backlog)))
        else:
            try:
                inp = EngineInput.from_request(req, task, kv_payload)
                # the first constrained request imports xgrammar and compiles: seconds, live
                await with_keepalive(self.keepalive, resp, self.engine.prepare(inp))
                stream = self.engine.add_request(inp)
            except EngineRequestError as e:
                if task is EngineTask.DECODE and not isinstance(e, ConstraintRejected):
                    raise StageError(ErrorCode.KV_MISMATCH, str(e), retryable=True) from None
                raise StageError(ErrorCode.BAD_REQUEST, str(e), retryable=False) from None
            offset, backlog = req.start_offset, []
        if not self.active:  # the engine's idle time is not a stall
            self.progress = time.monotonic()
        self.active[rid] = stream
        # what a detachable call's stream gave, for whoever attaches if its caller dies
        sent: list[int] | None = req.token_ids + backlog if req.detach else None
        returned = False
        try:
            key = await self._stream_frames(offset, stream, resp, sent)
            returned = True
            return key
        finally:
            self.active.pop(rid, None)
            if sent is not None and not returned and self._detachable(stream, resp):
                self._detach(rid, stream, sent, req.start_offset - len(req.token_ids))
            # Still live in the engine means the caller went away (or the write failed).
            elif self.engine.abort(rid) and self.failure is None:
                self.metrics.aborts.inc()
                log.info("Aborted Request ID: %s (t=%.6f)", rid, time.time())
            elif not returned and stream.kv_key is not None:
                # The prefill finished (or the request was exported) in the same moment its
                # caller left: nobody will ever hear of this KV, so free it now.
                if not self.kv.drop(stream.kv_key, "its caller left"):
                    self.engine.release_kv(stream.kv_key)
                self.metrics.aborts.inc()
                log.info(
                    "Aborted Request ID: %s (t=%.6f, its KV had just been kept)",
                    rid,
                    time.time(),
                )

    # -- detached requests -----------------------------------------------------------------

    def _detachable(self, stream: RequestStream, resp: FrameSink) -> bool:
        """The caller's connection broke while the engine still has the request (or its
        unread end) and nothing else is taking it away."""
        return (
            self.detach_grace > 0
            and resp.connection_lost
            and self.failure is None
            and stream.request_id not in self.giving_back
            and stream.finish_reason
            not in (EngineFinish.ABORT, EngineFinish.ERROR, EngineFinish.EXPORTED)
        )

    def _detach(self, rid: str, stream: RequestStream, known: list[int], shift: int) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.detach_grace, self._expire, rid, "nobody attached")
        self.detached[rid] = Detached(stream, known, shift, timer, time.monotonic())
        self.metrics.detached.inc()
        tracing.event("detached", {"reason": "its caller's connection broke"})
        log.info("Detached Request ID: %s (its caller's connection broke)", rid)

    def _expire(self, rid: str, why: str) -> None:
        d = self.detached.pop(rid, None)
        if d is None:
            return
        d.timer.cancel()
        if self.engine.abort(rid):
            self.metrics.aborts.inc()
        log.info("Aborted Request ID: %s (detached: %s)", rid, why)

    async def _released(self, rid: str) -> None:
        """A call for a request another call still runs: the frontend that took it over
        came before this worker noticed the old caller's connection break. Waits for that
        (it detaches), or, past RELEASE_S (the old caller lives), refuses: retryable, the
        new caller goes on from its tokens elsewhere."""
        deadline = time.monotonic() + RELEASE_S
        while rid in self.active:
            if time.monotonic() > deadline:
                raise StageError(
                    ErrorCode.ENGINE_ERROR, f"request {rid} is still running here", True
                )
            await asyncio.sleep(0.01)

    def _attach(
        self, req: EngineRequest, task: EngineTask
    ) -> tuple[RequestStream, list[int]] | None:
        """The detached request `req` continues, and the tokens its caller lacks; None if
        there is none, or it is not this request (its context is not a prefix of it)."""
        d = self.detached.get(req.request_id) if req.detach else None
        if d is None:
            return None
        n = len(req.token_ids)
        exact = (
            task is EngineTask.GENERATE
            and n <= len(d.known)
            and d.known[:n] == req.token_ids
            and req.start_offset == n + d.shift
            and req.sampling.logprobs is None
            and req.prompt_logprobs is None
        )
        if not exact:
            self._expire(req.request_id, "a call for it does not continue it")
            return None
        del self.detached[req.request_id]
        d.timer.cancel()
        self.metrics.attached.inc()
        tracing.event("attached", {"segue.offset": req.start_offset})
        log.info(
            "Attached Request ID: %s at token %d (detached %.0f ms)",
            req.request_id,
            req.start_offset,
            1000 * (time.monotonic() - d.since),
        )
        return d.stream, d.known[n:]

    def _written(self, tokens: int) -> None:
        self.progress = time.monotonic()
        self.metrics.output_tokens.inc(tokens)

    async def _stream_frames(
        self, offset: int, stream: RequestStream, resp: FrameSink, sent: list[int] | None = None
    ) -> str | None:
        call = DirectTokens(resp, offset, sent, self._written)
        try:
            return await self._frames(call, stream, resp)
        finally:
            stream.direct = None  # nothing is written for this call after it ends

    async def _frames(
        self, call: DirectTokens, stream: RequestStream, resp: FrameSink
    ) -> str | None:
        first = True
        while True:
            out = await stream.get(self.keepalive)
            call.flush()
            if out is None:
                await resp.write(KEEPALIVE_FRAME)
                continue
            self.progress = time.monotonic()
            data = b""
            ids = out.token_ids
            offset = call.offset
            if ids:
                crash_at = self.exit_after_tokens
                if crash_at is not None and offset + len(ids) >= crash_at:
                    cut = crash_at - offset
                    lps = out.logprobs[:cut] if out.logprobs else None
                    tokens = Tokens(offset, ids[:cut], lps, out.prompt_logprobs)
                    await resp.write(encode_frame(tokens))
                    await resp.flush()
                    log.warning("fault injection: exiting after token %d", crash_at)
                    os._exit(9)
                data = encode_frame(Tokens(offset, ids, out.logprobs, out.prompt_logprobs))
                if first:
                    first = False
                    tracing.event("first_token", {"segue.offset": offset})
                    if crash_at is None:  # the next tokens go out as the engine gives them
                        stream.direct = call
                call.offset = offset = offset + len(ids)
                if call.sent is not None:
                    call.sent += ids
                self.metrics.output_tokens.inc(len(ids))
            reason = out.finish_reason
            if reason is not None:
                tracing.event(
                    "engine_finished",
                    {"reason": reason.value, "segue.cached_tokens": stream.cached_tokens},
                )
            if reason == EngineFinish.PREFILLED:
                if data:
                    await resp.write(data)
                return stream.kv_key
            if reason == EngineFinish.EXPORTED:
                handle = self.kv.publish(stream.kv_key or "", stream.kv_tokens)
                log.info(
                    "Handed back Request ID: %s (live, %d tokens of KV)",
                    stream.request_id,
                    handle.num_tokens,
                )
                self.metrics.live_moves.inc()
                data += encode_frame(HandBack("moved with its KV", handle))
            elif reason == EngineFinish.ABORT:
                if stream.request_id not in self.giving_back:
                    return None  # aborted for its caller: nobody to tell
                self.giving_back.discard(stream.request_id)
                log.info("Handed back Request ID: %s", stream.request_id)
                data += encode_frame(HandBack("worker shutting down"))
            elif reason == EngineFinish.ERROR:
                code = (
                    ErrorCode.ENGINE_HUNG
                    if self.failure is EngineFailure.HUNG
                    else ErrorCode.ENGINE_ERROR
                )
                data += encode_frame(Error(code, out.error or "engine failed", True))
            elif reason is not None:
                final = Final(FinishReason(reason.value), offset, stream.cached_tokens)
                data += encode_frame(final)
            if reason is not None:
                await resp.write_eof(data)  # the final frame and the end of the body at once
                return None
            if data:
                await resp.write(data)
