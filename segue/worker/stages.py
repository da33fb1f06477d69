"""What a worker can do with one call, as stages the disaggregation strategies chain: run
it all here, prefill and hand over a KV handle, decode from a pulled KV, and call a remote
stage (relaying its frames, keeping our caller's stall timer quiet, logging its abort)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterator

import msgspec

from segue import tracing
from segue.discovery import Instance
from segue.engines.base import EngineTask
from segue.failures import Failure, FailureReason
from segue.protocol import (
    EngineRequest,
    Error,
    ErrorCode,
    Frame,
    KeepAlive,
    KvHandle,
    Phase,
    Prefilled,
    encode_frame,
    token_digest,
)
from segue.router import Router
from segue.transport import RequestPlane, drop_kv_soon, pull_kv
from segue.worker.kv_store import KvStore
from segue.worker.metrics import WorkerMetrics
from segue.worker.session import KEEPALIVE_FRAME, EngineSessions, with_keepalive
from segue.worker.sink import FrameSink, StageError

log = logging.getLogger("segue.worker")


class Stages:
    def __init__(
        self,
        sessions: EngineSessions,
        kv: KvStore,
        router: Router,
        plane: RequestPlane,
        metrics: WorkerMetrics,
        stall_timeout: float,
        keepalive: float,
    ) -> None:
        self.sessions = sessions
        self.kv = kv
        self.router = router
        self.plane = plane
        self.session = plane.session
        self.metrics = metrics
        self.stall_timeout = stall_timeout
        self.keepalive = keepalive

    async def local(self, req: EngineRequest, resp: FrameSink) -> None:
        await self.sessions.run(req, resp, EngineTask.GENERATE)

    async def prefill(self, req: EngineRequest, resp: FrameSink) -> None:
        """Prefill here and answer with the KV handle. If the caller is already gone (it
        gave up on us, e.g. after a stall), free the KV now rather than at its TTL."""
        key = await self.sessions.run(req, resp, EngineTask.PREFILL)
        if key is None:
            return
        if resp.caller_gone:
            self.sessions.engine.release_kv(key)
            log.info("prefill %s done after its caller left: KV freed", req.request_id)
            return
        handle = self.kv.publish(key, req.token_ids)
        try:
            await resp.write(encode_frame(Prefilled(handle)))
        except BaseException:
            self.kv.drop(key, "its caller left")
            raise

    async def decode(self, req: EngineRequest, kv: KvHandle | None, resp: FrameSink) -> None:
        """Pull the KV named by `kv`, check it is this request's, decode here."""
        if kv is None:
            raise StageError(ErrorCode.BAD_REQUEST, "a decode needs a KV handle", False)
        if kv.num_tokens != len(req.token_ids) or kv.digest != token_digest(req.token_ids):
            raise StageError(ErrorCode.KV_MISMATCH, "KV handle is for other tokens", True)
        start = time.perf_counter()
        try:
            payload = await with_keepalive(
                self.keepalive, resp, pull_kv(self.session, kv.url, kv.kv_id, self.stall_timeout)
            )
        except Failure as e:
            raise StageError(
                ErrorCode.REMOTE_FAILED, f"KV pull from {kv.url} failed: {e.message}", True
            ) from None
        except (asyncio.CancelledError, ConnectionResetError):
            # Our caller left mid-transfer: the holder may not have served the pull yet.
            drop_kv_soon(self.session, kv.url, kv.kv_id)
            raise
        tracing.event(
            "kv_transfer",
            {"segue.kv.bytes": len(payload), "segue.kv.seconds": time.perf_counter() - start,
             "segue.kv.source": kv.url},
        )  # fmt: skip
        req = msgspec.structs.replace(req, phase=Phase.DECODE, kv=kv)
        await self.sessions.run(req, resp, EngineTask.DECODE, payload)

    def remote_failure(self, inst: Instance, stage: str, f: Frame | Failure) -> StageError:
        """What to tell our caller when the remote stage failed (a frame or a Failure)."""
        if type(f) is Error and f.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNAVAILABLE):
            return StageError(f.code, f.message, False)
        if isinstance(f, Failure):
            self.router.mark_down(inst, f.label, f.action.process_gone)
            why = f.label
        else:
            why = f"answered {type(f).__name__}" + (f" {f.code}" if type(f) is Error else "")
        return StageError(
            ErrorCode.REMOTE_FAILED, f"remote {stage} on {inst.id} failed: {why}", True
        )

    async def relay(
        self, resp: FrameSink, inst: Instance, req: EngineRequest
    ) -> AsyncGenerator[Frame | Failure, None]:
        """Frames of a call to a remote stage, minus its keep-alives. Our own keep-alives go
        to our caller while we wait, so its stall timer judges us, not our peer. A failure
        of the call comes out as a Failure item (see remote_failure)."""
        queue: asyncio.Queue[Frame | Failure] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for f in self.plane.frames(inst, req, self.stall_timeout):
                    if type(f) is not KeepAlive:
                        await queue.put(f)
                await queue.put(Failure(FailureReason.STREAM_ENDED, inst))
            except Failure as e:
                await queue.put(e)
            except Exception as e:  # never leave the relay waiting on a dead pump
                log.exception("relay to %s failed", inst.id)
                await queue.put(Failure(FailureReason.STREAM_BROKEN, inst, f"relay: {e!r}"))

        task = asyncio.create_task(pump())
        try:
            while True:
                # not wait_for: on 3.11 it can swallow our caller's cancel when an item is
                # ready in the same moment, and the relay would run on for nobody
                try:
                    async with asyncio.timeout(self.keepalive):
                        item = await queue.get()
                except TimeoutError:
                    await resp.write(KEEPALIVE_FRAME)
                    continue
                yield item
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.contextmanager
    def remote_stage(self, req: EngineRequest, inst: Instance, stage: str) -> Iterator[None]:
        """Logs (and counts) a remote stage cancelled because our caller went away."""
        try:
            with self.router.track(inst):
                yield
        except (asyncio.CancelledError, ConnectionResetError):
            self.metrics.remote_aborts.inc()
            log.info(
                "Aborted Remote Request ID: %s (%s on %s, t=%.6f)",
                req.request_id,
                stage,
                inst.id,
                time.time(),
            )
            raise
