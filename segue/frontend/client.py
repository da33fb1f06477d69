"""The resilient client: runs one request against the workers, one attempt at a time.

An attempt sends the request state (prompt + every token received so far, the budget left)
to a worker and relays its tokens. When the attempt fails, the failure table
(segue.failures.ACTIONS) says whether to re-send it, where not to, and whether the retry
counts against `migration_limit`; a re-sent request carries its offset, so tokens the client
already has are dropped and the output is exactly that of an uninterrupted run. Cancellation
(the consumer closing the generator) closes the call, which cancels it on the worker, and is
never retried.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

from prometheus_client import Counter

from segue import tracing
from segue.disagg import PrefillFallback, Strategy
from segue.discovery import Instance
from segue.failures import Failure, FailureReason, Verdict, failure_of_frame
from segue.frontend import frontend_driven
from segue.frontend.errors import MigrationError, NoWorkerError, OverloadedError, RejectedError
from segue.frontend.request import BadFrame, RequestState, TokenDelta
from segue.protocol import EngineRequest, Final, KeepAlive, KvHandle, Phase, Role, Tokens
from segue.router import Router
from segue.transport import RequestPlane, drop_kv_soon

log = logging.getLogger("segue.frontend")


class ResilientClient:
    def __init__(
        self,
        router: Router,
        plane: RequestPlane,
        migrations_total: Counter,
        kv_fallbacks: Counter,
        migration_limit: int = 3,
        stall_timeout: float = 5.0,
        strategy: Strategy = Strategy.NONE,
        prefill_fallback: PrefillFallback = PrefillFallback.NONE,
    ) -> None:
        self.router = router
        self.plane = plane
        self.migrations_total = migrations_total
        self.kv_fallbacks = kv_fallbacks
        self.migration_limit = migration_limit
        self.stall_timeout = stall_timeout
        self.strategy = Strategy(strategy)
        self.prefill_fallback = PrefillFallback(prefill_fallback)

    def can_route(self, model: str) -> bool:
        """Whether some worker could take a new request for `model` now."""
        return self.router.can_pick(self.strategy.first_role, model)

    async def generate(self, state: RequestState) -> AsyncGenerator[TokenDelta, None]:
        """Yields the client's new tokens as they arrive, then a delta with the finish."""
        exclude: set[str] = set()
        resume: KvHandle | None = None  # a live move: the KV to decode on from
        while True:
            done = state.finished()
            if done:
                if resume is not None:  # nothing left to generate: the KV is not needed
                    drop_kv_soon(self.plane.session, resume.url, resume.kv_id)
                yield TokenDelta([], done)
                return
            try:
                attempt = (
                    self._resume(state, exclude, resume)
                    if resume is not None
                    else self._attempt(state, exclude)
                )
                # aclosing: if our consumer stops (cancel, stop string), the upstream
                # response is closed now, which cancels the call on the worker.
                async with contextlib.aclosing(attempt) as stream:
                    async for item in stream:
                        yield item
                        if item.finish_reason is not None:
                            return
                raise Failure(FailureReason.STREAM_ENDED)  # an attempt always finishes
            except Failure as f:
                if resume is not None:
                    self.kv_fallbacks.labels(reason=f.label).inc()
                    log.warning(
                        "live move of %s failed (%s): recomputing", state.request_id, f.label
                    )
                resume = f.resume
                self._after_failure(state, f, exclude)
            except BaseException:
                if resume is not None:  # cancelled while moving: free the KV on the source
                    drop_kv_soon(self.plane.session, resume.url, resume.kv_id)
                raise

    def _after_failure(self, state: RequestState, f: Failure, exclude: set[str]) -> None:
        """Applies the failure table; raises when the request cannot go on."""
        action = f.action
        if action.verdict is Verdict.NO_WORKER:
            raise NoWorkerError(f.message)
        if action.verdict is Verdict.REJECT:
            raise RejectedError(f.message)
        if f.reason is FailureReason.OVERLOADED:
            state.count_refusal()
        if f.instance is not None:
            if action.exclude:
                exclude.add(f.instance.id)
            if action.down:
                self.router.mark_down(f.instance, f.label, action.process_gone)
        if state.trace is not None:
            state.trace.span.add_event(
                "migration" if action.counted else "retry",
                {"reason": f.label, "segue.worker.id": f.instance.id if f.instance else "-"},
            )
        if not action.counted:
            return
        if not state.count_migration(self.migration_limit):
            log.error(
                "Cannot recreate stream: migration limit %d reached (last failure: %s)",
                self.migration_limit,
                f.label,
            )
            raise MigrationError(
                f"worker failed ({f.label}) and the migration limit "
                f"({self.migration_limit}) is reached"
            )
        self.migrations_total.labels(reason=f.label).inc()
        log.warning(
            "Stream disconnected... recreating stream... request %s, worker %s, reason %s, "
            "%d tokens received, attempt %d/%d",
            state.request_id,
            f.instance.id if f.instance else "-",
            f.label,
            len(state.generated),
            state.migrations,
            self.migration_limit,
        )

    def pick(self, role: Role, exclude: set[str], state: RequestState) -> Instance:
        inst = self._preferred(role, exclude, state)
        if inst is None:
            tokens = state.context if self.router.wants_tokens else None
            inst = self.router.pick((role,), exclude, state.model, tokens)
        if inst is None:
            if state.refused:
                raise OverloadedError(f"every worker is at its admission limit (role {role})")
            if state.migrations:
                log.error(
                    "Cannot recreate stream: no worker available (role %s) for %s",
                    role,
                    state.request_id,
                )
                raise MigrationError(f"no worker available (role {role}) to continue the request")
            raise NoWorkerError(f"no worker available (role {role})")
        state.worker = inst.id
        return inst

    def _preferred(self, role: Role, exclude: set[str], state: RequestState) -> Instance | None:
        """The worker a taken-over request runs on (once): it attaches to it there."""
        want, state.prefer = state.prefer, ""
        inst = self.router.instances.get(want) if want else None
        if inst is None or inst.role != role or inst.card.name != state.model:
            return None
        if inst.id in self.router.down or inst.id in exclude:
            return None
        return inst

    def _resume(
        self, state: RequestState, exclude: set[str], kv: KvHandle
    ) -> AsyncGenerator[TokenDelta, None]:
        """The attempt after a live move: a decode from the moved KV, on any worker that
        decodes (it pulls the KV from the worker that gave the request back)."""
        tokens = state.context if self.router.wants_tokens else None
        inst = self.router.pick((Role.AGGREGATED, Role.DECODE), exclude, state.model, tokens)
        if inst is None:
            raise NoWorkerError("no worker available to continue a moved request")
        return self.relay_tokens(inst, state, state.engine_request(Phase.DECODE, kv))

    def _attempt(self, state: RequestState, exclude: set[str]) -> AsyncGenerator[TokenDelta, None]:
        if self.strategy is Strategy.FRONTEND:
            return frontend_driven.attempt(self, state, exclude)
        inst = self.pick(self.strategy.first_role, exclude, state)
        return self.relay_tokens(inst, state, state.engine_request())

    async def relay_tokens(
        self, inst: Instance, state: RequestState, req: EngineRequest
    ) -> AsyncGenerator[TokenDelta, None]:
        """One call: yields the tokens the client does not have yet, then the finish. A
        traced request's attempt span records how the call ended: finished, failed and
        why, or closed by its consumer (the client left, or a stop string)."""
        req, span = state.open_attempt(inst.id, inst.role, req)
        outcome = "closed"
        try:
            with self.router.track(inst, len(req.token_ids)):
                frames = self.plane.frames(inst, req, self.stall_timeout)
                async with contextlib.aclosing(frames) as fs:
                    async for f in fs:
                        if type(f) is Tokens:
                            try:
                                delta = state.accept(f)
                            except BadFrame as e:
                                raise Failure(e.reason, inst) from None
                            if delta is not None:
                                if span is not None and state.trace is not None:
                                    state.trace.token()
                                yield delta
                        elif type(f) is Final:
                            outcome = f"finished: {f.finish_reason}"
                            yield state.finish(f)
                            return
                        elif type(f) is not KeepAlive:
                            raise failure_of_frame(f, inst)
        except Failure as e:
            outcome = f"failed: {e.label}"
            if span is not None:
                tracing.fail(span, e.label)
            raise
        finally:
            if span is not None:
                span.set_attribute("segue.attempt.outcome", outcome)
                span.end()
