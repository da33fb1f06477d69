"""The engine interface a worker drives.

An engine takes an `EngineInput` (token ids, sampling, the task) and returns a
`RequestStream`: a channel the engine pushes token ids into and finishes. The worker reads it
with a timeout (to send keep-alive frames) and calls `engine.abort()` when its caller goes
away; abort must free the request's KV at once and finish the stream with `ABORT`.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import msgspec

from segue.protocol import EngineRequest, FinishReason, Logprob, Phase
from segue.sampling import GREEDY, SamplingParams


class EngineTask(StrEnum):
    GENERATE = "generate"  # prefill (if needed) and decode
    PREFILL = "prefill"  # compute the KV of the context, keep it under a key, make no token
    DECODE = "decode"  # decode from a KV payload pulled from a prefill worker


class EngineFinish(StrEnum):
    """How an engine request ended: the two OpenAI reasons, or one the worker handles."""

    STOP = FinishReason.STOP.value
    LENGTH = FinishReason.LENGTH.value
    ABORT = "abort"  # aborted: its caller left, or the worker hands it back
    ERROR = "error"  # the engine failed it
    PREFILLED = "prefilled"  # a PREFILL is done; `RequestStream.kv_key` names its KV
    EXPORTED = "exported"  # stopped for a live move: `kv_key` names the KV of `kv_tokens`


@dataclass(frozen=True, slots=True)
class EngineInput:
    """What an engine needs for one request, and nothing of the request plane."""

    request_id: str
    token_ids: list[int]  # the whole context: prompt (+ tokens generated before a migration)
    max_tokens: int
    sampling: SamplingParams = GREEDY
    task: EngineTask = EngineTask.GENERATE
    kv_payload: bytes | None = None  # DECODE: the KV of token_ids, from the prefill worker
    prompt_logprobs: int | None = None  # with the first token: the context's logprobs
    generated: int = 0  # the last tokens of token_ids were generated (before a migration)

    @classmethod
    def from_request(
        cls, req: EngineRequest, task: EngineTask | None = None, kv_payload: bytes | None = None
    ) -> EngineInput:
        if task is None:
            task = {Phase.PREFILL: EngineTask.PREFILL, Phase.DECODE: EngineTask.DECODE}.get(
                req.phase, EngineTask.GENERATE
            )
        return cls(
            request_id=req.request_id,
            token_ids=req.token_ids,
            max_tokens=req.max_tokens,
            sampling=req.sampling,
            task=task,
            kv_payload=kv_payload,
            prompt_logprobs=req.prompt_logprobs,
            generated=req.start_offset,
        )


@dataclass(slots=True)
class EngineOutput:
    token_ids: list[int]
    finish_reason: EngineFinish | None = None
    error: str | None = None
    logprobs: list[Logprob] | None = None  # one per token, when the request asked
    prompt_logprobs: list[Logprob | None] | None = None  # once, with the first tokens


class EngineStats(msgspec.Struct):
    """What an engine holds now; a worker's /health shows it as `engine`."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    held: int = 0  # prefilled KV kept for a decode worker to pull
    # prompt tokens by where their KV came from: "computed", "local_cache_hit",
    # "external_kv_transfer" (cumulative; empty for engines that do not count)
    prompt_tokens: dict[str, int] = {}
    block_size: int = 0  # tokens per KV block (0: the engine does not say)


class EngineRequestError(ValueError):
    """The engine cannot serve this request at all (too long for its KV cache...)."""


class ConstraintRejected(EngineRequestError):
    """The request's constraint cannot compile, or the tokens it already generated are not
    accepted by it (a corrupted or forged context): no worker can serve it."""


def _wake(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class RequestStream:
    """Single-producer, single-consumer token channel; coalesces tokens produced between
    reads so a fast engine sends fewer, larger frames. The reader waits on a bare future with
    a timer for its timeout: `asyncio.wait_for` would make a task per token. A reader may
    set `direct`, which takes each token as it is pushed (True: taken; False: queue it):
    a worker writes it to its caller in the same callback, with no wake-up of its task."""

    __slots__ = (
        "request_id",
        "_pending",
        "_logprobs",
        "_prompt_logprobs",
        "_finish",
        "_error",
        "_waiter",
        "kv_key",
        "kv_tokens",
        "cached_tokens",
        "direct",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._pending: list[int] = []
        self._logprobs: list[Logprob] | None = None
        self._prompt_logprobs: list[Logprob | None] | None = None
        self._finish: EngineFinish | None = None
        self._error: str | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self.kv_key: str | None = None  # a finished PREFILL's KV, for `Engine.kv_payload`
        self.kv_tokens: list[int] = []  # the context an EXPORTED request's KV covers
        self.cached_tokens = 0  # leading context tokens the engine found in its KV cache
        self.direct: Callable[[int, Logprob | None], bool] | None = None

    def push(self, token_id: int, logprob: Logprob | None = None) -> None:
        direct = self.direct
        if direct is not None and not self._pending and direct(token_id, logprob):
            return
        self._pending.append(token_id)
        if logprob is not None:
            if self._logprobs is None:
                self._logprobs = []
            self._logprobs.append(logprob)
        if self._waiter is not None:
            _wake(self._waiter, True)

    def set_prompt_logprobs(self, logprobs: list[Logprob | None]) -> None:
        """The context's logprobs (None for its first token); read with the next tokens."""
        self._prompt_logprobs = logprobs

    def finish(self, reason: EngineFinish, error: str | None = None) -> None:
        if self._finish is None:
            self._finish = reason
            self._error = error
            if self._waiter is not None:
                _wake(self._waiter, True)

    @property
    def finished(self) -> bool:
        return self._finish is not None

    @property
    def finish_reason(self) -> EngineFinish | None:
        return self._finish

    async def get(self, timeout: float | None = None) -> EngineOutput | None:
        """Next batch of tokens (and the finish reason once done); None on timeout."""
        if not self._pending and self._finish is None:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[bool] = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _wake, waiter, False)
            self._waiter = waiter
            try:
                if not await waiter:
                    return None  # timed out
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        out = EngineOutput(
            self._pending, self._finish, self._error, self._logprobs, self._prompt_logprobs
        )
        self._pending = []
        self._logprobs = self._prompt_logprobs = None
        return out


class KvEvents(Protocol):
    """Where an engine reports the blocks (segue.blocks hashes) it caches and evicts."""

    def start(self, block_size: int, capacity: int, blocks: list[int]) -> None: ...

    def stored(self, hashes: list[int]) -> None: ...

    def removed(self, hashes: list[int]) -> None: ...


class Engine(abc.ABC):
    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    def release_files(self) -> None:  # noqa: B027 - optional hook
        """Delete what the engine keeps on disk, without a call into the engine: a worker
        whose engine died or hung exits without `stop()`, which may never return."""

    async def prepare(self, inp: EngineInput) -> None:  # noqa: B027 - optional hook
        """Work to do off the event loop before `add_request` (compiling a grammar)."""

    @abc.abstractmethod
    def add_request(self, inp: EngineInput) -> RequestStream:
        """Queue a request; raises EngineRequestError if it can never be served (or, for a
        DECODE, if the KV payload does not belong to its tokens)."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV at once; True if it was still live."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    # Disaggregation. A PREFILL finishes with PREFILLED and `stream.kv_key` set; the engine
    # keeps that KV (its blocks stay used) until `release_kv(key)`.

    def kv_payload(self, key: str) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} cannot export KV")

    def kv_nbytes(self, key: str) -> int:
        return 0  # unknown until pulled

    def export(self, request_id: str) -> bool:
        """Stop a running request and keep the KV of its context (prompt + every token it
        pushed) for pulling, as a finished prefill's; its stream then finishes EXPORTED with
        `kv_key` and `kv_tokens` set. False: unknown, not prefilled yet, or this engine
        cannot export a running request."""
        return False

    def publish_kv_events(self, events: KvEvents) -> bool:
        """Report cached and evicted blocks to `events` from now on (after calling its
        `start` with the cache as it is); False: this engine has no prefix cache to show."""
        return False

    def release_kv(self, key: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot export KV")

    @property
    def healthy(self) -> bool:
        return True
