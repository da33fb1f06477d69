"""Disaggregation strategy `frontend` (segue.disagg), run by the resilient client: call a
prefill worker for a KV handle, then a decode worker with it. With no prefill worker and
`--prefill-fallback local`, the decode worker does it all (Phase.LOCAL)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Protocol

from segue import tracing
from segue.disagg import PrefillFallback
from segue.discovery import Instance
from segue.failures import Failure, FailureReason, failure_of_frame
from segue.frontend.errors import NoWorkerError
from segue.frontend.request import RequestState, TokenDelta
from segue.protocol import EngineRequest, KeepAlive, KvHandle, Phase, Prefilled, Role
from segue.router import Router
from segue.transport import RequestPlane, drop_kv_soon


class Caller(Protocol):
    """What this strategy uses of the resilient client that runs its attempt."""

    router: Router
    plane: RequestPlane
    stall_timeout: float
    prefill_fallback: PrefillFallback

    def pick(self, role: Role, exclude: set[str], state: RequestState) -> Instance: ...

    def relay_tokens(
        self, inst: Instance, state: RequestState, req: EngineRequest
    ) -> AsyncGenerator[TokenDelta, None]: ...


async def attempt(
    client: Caller, state: RequestState, exclude: set[str]
) -> AsyncGenerator[TokenDelta, None]:
    handle = await remote_prefill(client, state, exclude)
    if handle is None:  # no prefill worker; fallback: the decode worker does it all
        inst = client.pick(Role.DECODE, exclude, state)
        async for item in client.relay_tokens(inst, state, state.engine_request(Phase.LOCAL)):
            yield item
        return
    inst = client.pick(Role.DECODE, exclude, state)
    pulled = False
    try:
        req = state.engine_request(Phase.DECODE, handle)
        async for item in client.relay_tokens(inst, state, req):
            pulled = True
            yield item
    finally:
        if not pulled:  # cancelled or failed before decoding: free the payload now
            drop_kv_soon(client.plane.session, handle.url, handle.kv_id)


async def remote_prefill(client: Caller, state: RequestState, exclude: set[str]) -> KvHandle | None:
    """The KV handle of the prompt from a prefill worker (None: fall back to local)."""
    tokens = state.prompt_ids if client.router.wants_tokens else None
    inst = client.router.pick((Role.PREFILL,), exclude, state.model, tokens)
    if inst is None:
        if client.prefill_fallback is PrefillFallback.LOCAL:
            return None
        raise NoWorkerError("no prefill worker available (and no local prefill fallback)")
    refused: Failure | None = None
    req, span = state.open_attempt(inst.id, inst.role, state.engine_request(Phase.PREFILL))
    try:
        frames = client.plane.frames(inst, req, client.stall_timeout)
        async with contextlib.aclosing(frames) as fs:
            async for f in fs:
                if type(f) is Prefilled:
                    return f.kv
                if type(f) is not KeepAlive:
                    refused = failure_of_frame(f, inst)
                    break
    except Failure as e:  # the transport failed: counted as prefill_stall, ...
        e.stage = "prefill"
        refused = e
        raise
    finally:
        if span is not None:
            if refused is not None:
                tracing.fail(span, refused.label)
            span.end()
    raise refused or Failure(FailureReason.STREAM_ENDED, inst, stage="prefill")
