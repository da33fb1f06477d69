"""Why a call to a worker failed, and what the caller does about it: the failure table.

Every way a call can end without its final frame becomes a `Failure` with a reason. The
resilient client (frontend/client.py) looks the reason up in `ACTIONS` to decide whether to
re-send the request, to which workers, and whether the retry counts against the migration
limit. A disaggregated first-stage worker uses the same reasons for the stage it calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from segue.discovery import Instance
from segue.protocol import Error, ErrorCode, Frame, HandBack, KvHandle


class FailureReason(StrEnum):
    """The `reason` label of `segue_frontend_migrations_total` (prefixed `prefill_` when a
    frontend-driven remote prefill failed)."""

    # The transport saw it (the worker said nothing).
    CONNECTION_REFUSED = "connection_refused"
    STREAM_BROKEN = "stream_broken"  # reset or closed mid-body
    STREAM_ENDED = "stream_ended"  # body ended without a final frame
    STALL = "stall"  # no byte within the stall timeout
    BAD_FRAME = "bad_frame"  # not a segue worker, or a bug
    HTTP_ERROR = "http_error"  # a status other than 200
    TOKEN_GAP = "token_gap"  # a frame skipped tokens: a protocol bug
    # The worker said it (a HandBack or an Error frame).
    HANDED_BACK = "drain"  # drain timeout: the worker gave the request back
    DRAINING = ErrorCode.DRAINING.value
    ENGINE_UNHEALTHY = ErrorCode.ENGINE_UNHEALTHY.value
    ENGINE_ERROR = ErrorCode.ENGINE_ERROR.value
    ENGINE_HUNG = ErrorCode.ENGINE_HUNG.value
    KV_MISMATCH = ErrorCode.KV_MISMATCH.value
    REMOTE_FAILED = ErrorCode.REMOTE_FAILED.value
    OVERLOADED = ErrorCode.OVERLOADED.value
    UNAVAILABLE = ErrorCode.UNAVAILABLE.value
    BAD_REQUEST = ErrorCode.BAD_REQUEST.value


class Verdict(Enum):
    RETRY = "retry"  # re-send (elsewhere, per `exclude`)
    NO_WORKER = "no_worker"  # nothing can serve it: 503
    REJECT = "reject"  # re-sending cannot help: 400


@dataclass(frozen=True, slots=True)
class Action:
    verdict: Verdict
    exclude: bool = True  # do not re-send to the same worker
    down: bool = True  # take the worker out of rotation until a health probe answers
    counted: bool = True  # the retry counts against the migration limit
    process_gone: bool = False  # the worker's process is likely gone, with its siblings


_BROKEN = Action(Verdict.RETRY)
_GONE = Action(Verdict.RETRY, process_gone=True)  # refused, broken, silent

ACTIONS: dict[FailureReason, Action] = {
    FailureReason.CONNECTION_REFUSED: _GONE,
    FailureReason.STREAM_BROKEN: _GONE,
    FailureReason.STREAM_ENDED: _BROKEN,
    FailureReason.STALL: _GONE,  # a hung or cut-off process stalls every worker in it
    FailureReason.BAD_FRAME: _BROKEN,
    FailureReason.HTTP_ERROR: _BROKEN,
    FailureReason.TOKEN_GAP: _BROKEN,
    # A draining worker is healthy and leaves discovery by itself.
    FailureReason.HANDED_BACK: Action(Verdict.RETRY, down=False),
    # Refused before any work: routing elsewhere is not a migration.
    FailureReason.DRAINING: Action(Verdict.RETRY, down=False, counted=False),
    FailureReason.ENGINE_UNHEALTHY: _BROKEN,
    FailureReason.ENGINE_ERROR: _BROKEN,
    FailureReason.ENGINE_HUNG: _BROKEN,
    FailureReason.KV_MISMATCH: _BROKEN,
    # Its peer stage failed; this worker is fine and may take the retry.
    FailureReason.REMOTE_FAILED: Action(Verdict.RETRY, exclude=False, down=False),
    # At its admission limit before any work: try another, not a migration.
    FailureReason.OVERLOADED: Action(Verdict.RETRY, down=False, counted=False),
    FailureReason.UNAVAILABLE: Action(Verdict.NO_WORKER, exclude=False, down=False),
    FailureReason.BAD_REQUEST: Action(Verdict.REJECT, exclude=False, down=False),
}


class Failure(Exception):
    """One call failed. `stage` names a remote stage ("prefill") the caller ran first."""

    def __init__(
        self,
        reason: FailureReason,
        instance: Instance | None = None,
        message: str = "",
        stage: str = "",
    ) -> None:
        super().__init__(message or reason.value)
        self.reason = reason
        self.instance = instance
        self.message = message or reason.value
        self.stage = stage
        self.resume: KvHandle | None = None  # a live move: decode on from this KV

    @property
    def action(self) -> Action:
        return ACTIONS[self.reason]

    @property
    def label(self) -> str:
        return f"{self.stage}_{self.reason.value}" if self.stage else self.reason.value


def failure_of_frame(frame: Frame, instance: Instance | None) -> Failure:
    """A frame that is neither tokens nor the end of a stream, as a Failure (a HandBack, an
    Error; anything else out of place is a protocol error)."""
    if type(frame) is HandBack:
        f = Failure(FailureReason.HANDED_BACK, instance, frame.reason)
        f.resume = frame.kv
        return f
    if type(frame) is Error:
        return Failure(FailureReason(frame.code.value), instance, frame.message)
    return Failure(FailureReason.BAD_FRAME, instance, f"unexpected {type(frame).__name__}")
