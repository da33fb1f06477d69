"""Strategy `prefill-first`, on the prefill worker that receives the request: prefill here,
have a decode worker pull the KV, and relay its stream to our caller."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import msgspec

from segue.engines.base import EngineTask
from segue.failures import Failure, FailureReason
from segue.protocol import EngineRequest, ErrorCode, Final, Phase, Role, Tokens, encode_frame
from segue.worker.sink import FrameSink, StageError

if TYPE_CHECKING:
    from segue.worker.stages import Stages


async def run(stages: Stages, req: EngineRequest, resp: FrameSink) -> None:
    key = await stages.sessions.run(req, resp, EngineTask.PREFILL)
    if key is None:
        return
    kv = stages.kv.publish(key, req.token_ids)
    try:
        inst = stages.router.pick((Role.DECODE,))
        if inst is None:
            raise StageError(ErrorCode.UNAVAILABLE, "no decode worker available", False)
        with stages.remote_stage(req, inst, "decode"):
            decode = msgspec.structs.replace(req, phase=Phase.DECODE, kv=kv)
            async with contextlib.aclosing(stages.relay(resp, inst, decode)) as frames:
                async for f in frames:
                    if type(f) is Tokens or type(f) is Final:
                        await resp.write(encode_frame(f))
                        if type(f) is Final:
                            return
                    else:
                        raise stages.remote_failure(inst, "decode", f)
        raise stages.remote_failure(inst, "decode", Failure(FailureReason.STREAM_ENDED, inst))
    finally:
        stages.kv.drop(key, "request over before its KV was pulled")
