"""The bodies of GET /health, typed: what a worker says of itself and what a frontend says
of the workers it routes to. The worker and the frontend encode them; the router's probes,
`segue serve` and `segue chaos` decode them (an unknown field is ignored, so a newer
process may add fields)."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from segue.engines.base import EngineStats
from segue.protocol import Role


class WorkerStatus(StrEnum):
    OK = "ok"
    DRAINING = "draining"  # leaving: new calls are refused (retryable)
    UNHEALTHY = "unhealthy"  # its engine died or hung


class WorkerHealth(msgspec.Struct):
    """A worker's GET /health (200 while healthy, else 503)."""

    status: WorkerStatus
    id: str
    role: Role
    pid: int
    url: str
    engine: EngineStats


class WorkerEntry(msgspec.Struct):
    """One worker in a frontend's GET /health."""

    id: str
    role: Role
    pid: int
    url: str
    model: str
    routable: bool
    kv_blocks: int | None = None  # its prefix cache's blocks in the frontend's KV index


class FrontendStatus(StrEnum):
    OK = "ok"
    UNAVAILABLE = "unavailable"


class FrontendHealth(msgspec.Struct):
    """A frontend's GET /health (200 when a request could be routed now, else 503)."""

    status: FrontendStatus
    workers: list[WorkerEntry]

    @property
    def routable(self) -> list[WorkerEntry]:
        return [w for w in self.workers if w.routable]


_encoder = msgspec.json.Encoder()
_worker_decoder = msgspec.json.Decoder(WorkerHealth)
_frontend_decoder = msgspec.json.Decoder(FrontendHealth)


def encode(body: WorkerHealth | FrontendHealth) -> bytes:
    return _encoder.encode(body)


def decode_worker(data: bytes) -> WorkerHealth | None:
    """A worker's body; None if it is not one."""
    try:
        return _worker_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def decode_frontend(data: bytes) -> FrontendHealth | None:
    """A frontend's body; None if it is not one."""
    try:
        return _frontend_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
