"""The state of one request (one choice) as the workers see it, and the only place it
changes: each worker frame is accepted here (offset, gap and logprob checks), each failure
is counted here, and what to re-send after one is built here.

A token frame carries the offset of its first token in the client's output; a re-sent
request's worker starts from where the client is, so a frame may repeat tokens the client
has (dropped here) but never skip any (a gap: the attempt is broken).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from segue import tracing
from segue.failures import FailureReason
from segue.protocol import EngineRequest, Final, FinishReason, KvHandle, Logprob, Phase, Tokens
from segue.sampling import GREEDY, SamplingParams
from segue.stopping import finish_reason
from segue.tracing import RequestTrace


@dataclass(slots=True)
class TokenDelta:
    """What one frame adds to a choice's output: the client's new tokens (with their
    logprobs, when asked), or its end (with the finish reason and the cache hits)."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[Logprob] | None = None  # one per token, when the request asked
    prompt_logprobs: list[Logprob | None] | None = None  # once (echo), with the first tokens
    cached_tokens: int = 0  # with the finish: prompt tokens the worker found in its cache


class BadFrame(Exception):
    """A frame that cannot belong to this request's output: the attempt is broken."""

    def __init__(self, reason: FailureReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    model: str = "segue-mocker"  # served name: only workers of this model may take it
    sampling: SamplingParams = GREEDY
    eos_token_ids: frozenset[int] = frozenset()
    echo_logprobs: bool = False  # also the prompt's logprobs (echo with logprobs)
    generated: list[int] = field(default_factory=list)
    migrations: int = 0
    refused: int = 0  # workers that answered `overloaded` to it
    has_prompt_logprobs: bool = False  # received once: a re-sent request does not ask again
    # A background response: its worker keeps it running if this frontend dies, and the
    # frontend that takes it over attaches to it there (`prefer`: that worker, tried first).
    detach: bool = False
    worker: str = ""  # the worker of the latest attempt
    prefer: str = ""
    trace: RequestTrace | None = None  # with --otlp-traces-endpoint

    def open_attempt(self, worker: str, role: str, req: EngineRequest) -> tuple[EngineRequest, Any]:
        """`req` carrying the trace context of a new attempt span (and the span), when
        the request is traced; else `req` and None."""
        if self.trace is None:
            return req, None
        span = self.trace.attempt(worker, role, req.phase.value)
        return msgspec.structs.replace(req, traceparent=tracing.traceparent(span)), span

    @property
    def context(self) -> list[int]:
        """The tokens a worker continues from: prompt + every token received."""
        return self.prompt_ids + self.generated

    def engine_request(
        self, phase: Phase = Phase.GENERATE, kv: KvHandle | None = None
    ) -> EngineRequest:
        """What to send a worker now: the context so far and the budget left."""
        asked = self.echo_logprobs and not self.has_prompt_logprobs
        return EngineRequest(
            request_id=self.request_id,
            token_ids=self.context,
            max_tokens=self.max_tokens - len(self.generated),
            start_offset=len(self.generated),
            sampling=self.sampling,
            phase=phase,
            kv=kv,
            prompt_logprobs=self.sampling.logprobs if asked else None,
            detach=self.detach,
        )

    def accept(self, frame: Tokens) -> TokenDelta | None:
        """The part of a token frame the client does not have yet (None: nothing new);
        raises BadFrame for a gap or logprobs that do not match the tokens."""
        skip = len(self.generated) - frame.offset
        if skip < 0:
            raise BadFrame(FailureReason.TOKEN_GAP)
        new = frame.token_ids[skip:] if skip else frame.token_ids
        if not new:
            return None
        lps = None
        prompt_lps = None
        if self.sampling.logprobs is not None:
            if frame.logprobs is None or len(frame.logprobs) != len(frame.token_ids):
                raise BadFrame(FailureReason.BAD_FRAME)
            lps = frame.logprobs[skip:]
            if frame.prompt_logprobs is not None and not self.has_prompt_logprobs:
                prompt_lps = frame.prompt_logprobs
                self.has_prompt_logprobs = True
        self.generated.extend(new)
        return TokenDelta(new, None, lps, prompt_lps)

    def finish(self, frame: Final) -> TokenDelta:
        return TokenDelta([], frame.finish_reason, cached_tokens=frame.cached_tokens)

    def finished(self) -> FinishReason | None:
        """The finish reason if the tokens received already complete the request (a stream
        that broke after its last token but before its Final frame)."""
        if not self.generated:
            return None
        sp = self.sampling
        return finish_reason(
            self.generated[-1],
            len(self.generated),
            self.max_tokens,
            sp.stop_token_ids,
            self.eos_token_ids,
            sp.ignore_eos,
        )

    def count_refusal(self) -> None:
        self.refused += 1

    def count_migration(self, limit: int) -> bool:
        """Counts a failure that re-sends the request; False: `limit` is reached."""
        if self.migrations >= limit:
            return False
        self.migrations += 1
        return True
