"""The engine interface a worker drives.

An engine takes an `EngineRequest` and returns a `RequestStream`: a channel the engine
pushes token ids into and finishes. The worker reads it with a timeout (to send keep-alive
frames) and calls `engine.abort()` when its caller goes away; abort must free the request's
KV at once and finish the stream with reason "abort".
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field

from segue.protocol import EngineRequest


@dataclass(slots=True)
class EngineOutput:
    token_ids: list[int]
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
    error: str | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    held: int = 0  # prefilled KV kept for a decode worker to pull
    # prompt tokens by where their KV came from: "computed", "local_cache_hit",
    # "external_kv_transfer" (cumulative; empty for engines that do not count)
    prompt_tokens: dict[str, int] = field(default_factory=dict)


class EngineRequestError(ValueError):
    """The engine cannot serve this request at all (too long for its KV cache...)."""


class RequestStream:
    """Single-producer, single-consumer token channel; coalesces tokens produced between
    reads so a fast engine sends fewer, larger frames."""

    __slots__ = ("request_id", "_pending", "_finish", "_error", "_event", "result")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._pending: list[int] = []
        self._finish: str | None = None
        self._error: str | None = None
        self._event = asyncio.Event()
        self.result: object = None  # phase-specific result (a KV handle for a prefill)

    def push(self, token_id: int) -> None:
        self._pending.append(token_id)
        self._event.set()

    def finish(self, reason: str, error: str | None = None) -> None:
        if self._finish is None:
            self._finish = reason
            self._error = error
            self._event.set()

    @property
    def finished(self) -> bool:
        return self._finish is not None

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    async def get(self, timeout: float | None = None) -> EngineOutput | None:
        """Next batch of tokens (and the finish reason once done); None on timeout."""
        if not self._pending and self._finish is None:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                return None
        self._event.clear()
        out = EngineOutput(self._pending, self._finish, self._error)
        self._pending = []
        return out


class Engine(abc.ABC):
    async def start(self) -> None:  # noqa: B027 - optional hook
        pass

    async def stop(self) -> None:  # noqa: B027 - optional hook
        pass

    def release_files(self) -> None:  # noqa: B027 - optional hook
        """Delete what the engine keeps on disk, without a call into the engine: a worker
        whose engine died or hung exits without `stop()`, which may never return."""

    @abc.abstractmethod
    def add_request(self, req: EngineRequest, kv_payload: bytes | None = None
                    ) -> RequestStream:
        """Queue a request; raises EngineRequestError if it can never be served (or, for a
        decode, if the KV payload does not belong to its tokens)."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV at once; True if it was still live."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    # Disaggregation. A "prefill" request finishes with reason "prefilled" and
    # `stream.result` set to a key; the engine keeps that KV (its blocks stay used) until
    # `release_kv(key)`. A "decode" request comes with the payload pulled from the prefill
    # side, which `add_request` checks against the request's tokens.

    def kv_payload(self, key: str) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} cannot export KV")

    def kv_nbytes(self, key: str) -> int:
        return 0  # unknown until pulled

    def release_kv(self, key: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} cannot export KV")

    @property
    def healthy(self) -> bool:
        return True
