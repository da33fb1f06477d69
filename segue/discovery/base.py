"""The discovery interface every backend implements: lease + TTL + watch."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

import msgspec

from segue.protocol import Role


class ModelCard(msgspec.Struct, frozen=True):
    """What a worker serves, so a frontend can serve it too: the frontend loads the tokenizer
    from `path` (workers and frontends share the model directory's path: a shared volume or
    the same image) and checks it is the same by `tokenizer_digest`. `path` empty: the
    built-in tokenizer."""

    name: str = "segue-mocker"
    tokenizer_digest: str = "builtin-1"
    context_length: int = 32768
    path: str = ""


class Instance(msgspec.Struct, frozen=True):
    id: str
    role: Role
    url: str
    pid: int
    host: str
    card: ModelCard = ModelCard()
    # The process this worker runs in, when it shares it with others (`segue worker
    # --replicas`): a failed connection to one takes its siblings out of rotation too.
    process: str = ""


class Lease(abc.ABC):
    @abc.abstractmethod
    async def revoke(self) -> None:
        """Leave discovery now (graceful shutdown); renewal stops."""


class Discovery(abc.ABC):
    @abc.abstractmethod
    async def register(self, instance: Instance, ttl: float) -> Lease:
        """Publish an instance; it stays visible while the lease is renewed."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[dict[str, Instance]]:
        """Yields the full set of live instances (by id) each time it changes."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
