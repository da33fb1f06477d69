"""Calls workers for one request and migrates it when a worker fails.

The frontend keeps every token it has received. When a call breaks before its Final frame
(worker killed, unreachable, hung past the stall timeout, or handing the request back while
shutting down), it re-sends prompt + received tokens with the remaining budget to another
worker, up to `migration_limit` times, and drops any token it already has (frames carry
offsets). A worker that says it is draining gets the request routed elsewhere without
counting an attempt. Cancellation (the consumer closing this generator) is never migrated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import Counter

from segue.discovery import Instance
from segue.protocol import (
    GENERATE_PATH,
    EngineRequest,
    Error,
    Final,
    FrameParser,
    HandBack,
    Tokens,
    encode_request,
)
from segue.router import Router

log = logging.getLogger("segue.frontend")


@dataclass
class Generation:
    """What the frontend asks of the engines for one client request."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    generated: list[int] = field(default_factory=list)
    migrations: int = 0


class NoWorkerError(Exception):
    """No worker can take the request (503)."""


class MigrationError(Exception):
    """The request broke and could not be recreated (limit reached or no worker left)."""


class RejectedError(Exception):
    """A worker refused the request for a reason re-sending cannot fix."""


class _Broken(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Migrator:
    def __init__(
        self,
        router: Router,
        session: aiohttp.ClientSession,
        migrations_total: Counter,
        migration_limit: int = 3,
        stall_timeout: float = 5.0,
        roles: tuple[str, ...] = ("aggregated",),
    ) -> None:
        self.router = router
        self.session = session
        self.migrations_total = migrations_total
        self.migration_limit = migration_limit
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=stall_timeout)
        self.roles = roles

    def _finished(self, g: Generation) -> str | None:
        """Finish reason if the tokens already received complete the request (a stream that
        broke after its last token but before its Final frame)."""
        if not g.generated:
            return None
        last = g.generated[-1]
        if last in g.stop_token_ids or (not g.ignore_eos and last in g.eos_token_ids):
            return "stop"
        if len(g.generated) >= g.max_tokens:
            return "length"
        return None

    async def generate(self, g: Generation) -> AsyncIterator[tuple[list[int], str | None]]:
        """Yields (new token ids, None) as tokens arrive, then ([], finish_reason)."""
        exclude: set[str] = set()
        while True:
            done = self._finished(g)
            if done:
                yield [], done
                return
            inst = self.router.pick(self.roles, exclude)
            if inst is None:
                if g.migrations:
                    log.error("Cannot recreate stream: no worker available for %s", g.request_id)
                    raise MigrationError("no worker available to continue the request")
                raise NoWorkerError("no worker available")
            try:
                # aclosing: if our consumer stops (cancel, stop string), the upstream
                # response is closed now, which cancels the call on the worker.
                async with contextlib.aclosing(self._call(inst, g)) as stream:
                    async for item in stream:
                        yield item
                        if item[1] is not None:
                            return
                raise _Broken("stream ended without a final frame")
            except _Broken as b:
                reason = b.reason
            except aiohttp.ClientConnectorError:
                reason = "connection_refused"
            except TimeoutError:
                reason = "stall"
            except aiohttp.ClientError:
                reason = "stream_broken"
            if reason == "draining":
                exclude.add(inst.id)  # routed elsewhere; not an attempt
                continue
            exclude.add(inst.id)
            if reason != "drain":
                self.router.mark_down(inst, reason)
            if g.migrations >= self.migration_limit:
                log.error(
                    "Cannot recreate stream: migration limit %d reached (last failure: %s)",
                    self.migration_limit, reason,
                )
                raise MigrationError(
                    f"worker failed ({reason}) and the migration limit "
                    f"({self.migration_limit}) is reached"
                )
            g.migrations += 1
            self.migrations_total.labels(reason=reason).inc()
            log.warning(
                "Stream disconnected... recreating stream... request %s, worker %s, reason %s, "
                "%d tokens received, attempt %d/%d",
                g.request_id, inst.id, reason, len(g.generated), g.migrations,
                self.migration_limit,
            )

    async def _call(
        self, inst: Instance, g: Generation
    ) -> AsyncIterator[tuple[list[int], str | None]]:
        req = EngineRequest(
            request_id=g.request_id,
            token_ids=g.prompt_ids + g.generated,
            max_tokens=g.max_tokens - len(g.generated),
            start_offset=len(g.generated),
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            stop_token_ids=g.stop_token_ids,
            ignore_eos=g.ignore_eos,
        )
        generated = g.generated
        with self.router.track(inst):
            async with self.session.post(
                inst.url + GENERATE_PATH, data=encode_request(req), timeout=self.timeout
            ) as resp:
                if resp.status != 200:
                    raise _Broken(f"http_{resp.status}")
                parser = FrameParser()
                async for chunk in resp.content.iter_any():
                    for f in parser.feed(chunk):
                        if type(f) is Tokens:
                            skip = len(generated) - f.offset
                            if skip < 0:
                                raise _Broken("token gap")  # never expected: protocol bug
                            new = f.token_ids[skip:] if skip else f.token_ids
                            if new:
                                generated.extend(new)
                                yield new, None
                        elif type(f) is Final:
                            yield [], f.finish_reason
                            return
                        elif type(f) is HandBack:
                            raise _Broken("drain")
                        elif type(f) is Error:
                            if f.code == "draining":
                                raise _Broken("draining")
                            if f.retryable:
                                raise _Broken(f.code)
                            raise RejectedError(f.message)
