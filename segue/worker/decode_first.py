"""Strategy `decode-first`, on the decode worker that receives the request: get the prompt
prefilled by a prefill worker, pull its KV, decode here. With no prefill worker and
`--prefill-fallback local`, prefill here too."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import msgspec

from segue.disagg import PrefillFallback
from segue.failures import Failure, FailureReason
from segue.protocol import EngineRequest, ErrorCode, KvHandle, Phase, Prefilled, Role
from segue.worker.sink import FrameSink, StageError

if TYPE_CHECKING:
    from segue.worker.stages import Stages

log = logging.getLogger("segue.worker")


async def run(
    stages: Stages, req: EngineRequest, resp: FrameSink, fallback: PrefillFallback
) -> None:
    inst = stages.router.pick((Role.PREFILL,))
    if inst is None:
        if fallback is PrefillFallback.LOCAL:
            log.info("no prefill worker: prefilling %s locally", req.request_id)
            await stages.local(req, resp)
            return
        raise StageError(ErrorCode.UNAVAILABLE, "no prefill worker available", False)
    kv: KvHandle | None = None
    prefill = msgspec.structs.replace(req, phase=Phase.PREFILL)
    with stages.remote_stage(req, inst, "prefill"):
        async with contextlib.aclosing(stages.relay(resp, inst, prefill)) as frames:
            async for f in frames:
                if type(f) is Prefilled:
                    kv = f.kv
                    break
                raise stages.remote_failure(inst, "prefill", f)
    if kv is None:
        raise stages.remote_failure(inst, "prefill", Failure(FailureReason.STREAM_ENDED, inst))
    await stages.decode(req, kv, resp)
