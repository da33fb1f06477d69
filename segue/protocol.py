"""The request plane between the frontend (or a first-stage worker) and a worker, and the
vocabulary every component shares.

A call carries a msgpack `EngineRequest` and answers a sequence of length-prefixed msgpack
`Frame`s, either on the caller's multiplexed connection to the worker (segue.mux) or as one
HTTP POST /generate. Every token frame carries the offset of its
first token in the client's output so a caller that re-sends a request can drop what it
already has; the end of a stream is always an explicit `Final` (or `HandBack`/`Error`)
frame, so a stream that simply stops is known to be broken. A CANCEL record (or closing
the HTTP response) cancels the call on the worker.
"""

from __future__ import annotations

import hashlib
import struct
from enum import StrEnum

import msgspec

from segue.sampling import GREEDY, SamplingParams


class Route:
    """Paths a worker serves (the frontend serves the OpenAI paths: frontend/http.py `Path`)."""

    GENERATE = "/generate"
    MUX = "/mux"  # a WebSocket carrying many calls (segue.mux)
    KV_EVENTS = "/kv_events"  # a WebSocket of KvSnapshot / KvEvents messages
    ADMIN_MOVE = "/admin/move"  # POST {"count": N} or {"request_id": ID}: live-move requests
    KV = "/kv/{key}"
    HEALTH = "/health"
    METRICS = "/metrics"

    @staticmethod
    def kv(key: str) -> str:
        return f"/kv/{key}"


CONTENT_TYPE = "application/x-segue-frames"


class PlaneKind(StrEnum):
    """How a caller reaches workers."""

    MUX = "mux"  # all calls to a worker on one WebSocket (GET /mux, segue.mux)
    HTTP = "http"  # one HTTP POST /generate per call


class Role(StrEnum):
    """What a worker does (discovery carries it; routing keys on it)."""

    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


class Phase(StrEnum):
    """What a call asks of the worker that receives it."""

    GENERATE = "generate"  # everything; a disaggregated first-stage worker runs its strategy
    PREFILL = "prefill"  # only the KV of the context: answer with a Prefilled frame
    DECODE = "decode"  # decode from the KV named in `EngineRequest.kv`
    LOCAL = "local"  # everything here, whatever the role (fallback: no prefill worker left)


class FinishReason(StrEnum):
    """How a request ended, as the OpenAI API names it."""

    STOP = "stop"  # a stop token or EOS (or, in the frontend, a stop string)
    LENGTH = "length"  # max_tokens reached
    TOOL_CALLS = "tool_calls"  # (frontend) the answer is tool calls: it stopped to call them


class ErrorCode(StrEnum):
    """`Error.code`: why a worker refused or failed a call. What the caller does with each
    is the failure table in `segue.failures`."""

    DRAINING = "draining"  # shutting down: route elsewhere (retryable)
    ENGINE_UNHEALTHY = "engine_unhealthy"  # its engine is dead (retryable)
    ENGINE_ERROR = "engine_error"  # the engine failed this request (retryable)
    ENGINE_HUNG = "engine_hung"  # the engine stopped making progress (retryable)
    KV_MISMATCH = "kv_mismatch"  # the pulled KV is not this request's (retryable)
    REMOTE_FAILED = "remote_failed"  # the other disaggregated stage failed (retryable)
    OVERLOADED = "overloaded"  # at its admission limit: try another worker (retryable)
    UNAVAILABLE = "unavailable"  # no worker for the other stage (503)
    BAD_REQUEST = "bad_request"  # can never be served (400)


class KvHandle(msgspec.Struct, frozen=True):
    """Where a prefill worker keeps the KV of a prompt, for a decode worker to pull."""

    url: str  # base URL of the worker that holds the payload
    kv_id: str
    num_tokens: int  # how many leading tokens of the context the payload covers
    digest: str  # fingerprint of those token ids; the puller checks it
    nbytes: int


def token_digest(token_ids: list[int]) -> str:
    """Fingerprint of a token sequence: ties a KV payload to the tokens it was made from."""
    return hashlib.blake2b(msgspec.msgpack.encode(token_ids), digest_size=16).hexdigest()


class Logprob(msgspec.Struct, array_like=True, frozen=True):
    """A generated token's log probability under the model (before temperature), and the
    `k` most likely tokens at its position with theirs, most likely first."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class EngineRequest(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int]  # prompt + tokens already generated (on migration)
    max_tokens: int  # remaining budget for this call
    start_offset: int = 0  # index in the client's output of the first token this call makes
    sampling: SamplingParams = GREEDY
    phase: Phase = Phase.GENERATE
    kv: KvHandle | None = None  # for Phase.DECODE
    prompt_logprobs: int | None = None  # the context's logprobs (echo), until received
    # The caller may vanish and another come back for it (a background response): when
    # the caller's connection breaks, the worker keeps it running for --detach-grace.
    detach: bool = False
    # W3C trace context of the caller's span (--otlp-traces-endpoint); empty: untraced
    traceparent: str = ""


class Tokens(msgspec.Struct, tag="tok"):
    offset: int
    token_ids: list[int]
    logprobs: list[Logprob] | None = None  # one per token, when the request asked
    # the context's tokens' (None for the first), in the first frame, when asked
    prompt_logprobs: list[Logprob | None] | None = None


class KeepAlive(msgspec.Struct, tag="ka"):
    """Sent while the engine is busy (a long prefill, a queue) so the caller's stall timer
    only fires on a worker that is really hung."""


class Final(msgspec.Struct, tag="fin"):
    finish_reason: FinishReason
    offset: int  # total tokens of the client's output once this call is done
    cached_tokens: int = 0  # leading tokens of this call's context found in the KV cache


class Prefilled(msgspec.Struct, tag="pre"):
    kv: KvHandle
    first_token: int | None = None


class HandBack(msgspec.Struct, tag="back"):
    """The worker gives the request back (it drains, or was asked to move it): re-send it
    elsewhere. With `kv`, the KV of its whole context (prompt + every token sent) waits to be
    pulled: the next worker decodes on from it instead of recomputing (a live move)."""

    reason: str
    kv: KvHandle | None = None


class Error(msgspec.Struct, tag="err"):
    code: ErrorCode
    message: str
    retryable: bool = False


Frame = Tokens | KeepAlive | Final | Prefilled | HandBack | Error


class KvSnapshot(msgspec.Struct, tag="snap"):
    """Every block a worker's engine caches, as of event `seq` (GET /kv_events)."""

    seq: int
    block_size: int
    capacity: int  # the engine's KV blocks: more indexed than this means missed removals
    blocks: list[int]


class KvEvents(msgspec.Struct, tag="ev"):
    """Blocks cached (`stored`) or evicted (`removed`) since event `seq - 1`."""

    seq: int
    stored: list[int] = []
    removed: list[int] = []


KvMessage = KvSnapshot | KvEvents
RESYNC = b"resync"  # a subscriber that saw a gap asks for a new snapshot

_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)
_request_decoder = msgspec.msgpack.Decoder(EngineRequest)
_LEN = struct.Struct(">I")


def encode_request(req: EngineRequest) -> bytes:
    return _encoder.encode(req)


def decode_request(data: bytes) -> EngineRequest:
    return _request_decoder.decode(data)


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _LEN.pack(len(body)) + body


class FrameParser:
    """Splits a byte stream into frames; chunks may hold several frames or part of one."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[Frame]:
        buf = self._buf
        buf += chunk
        frames: list[Frame] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if n - pos - 4 < size:
                break
            frames.append(_frame_decoder.decode(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
