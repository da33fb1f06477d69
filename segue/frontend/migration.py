"""Calls workers for one request and migrates it when a worker fails.

The frontend keeps every token it has received. When a call breaks before its Final frame
(worker killed, unreachable, hung past the stall timeout, or handing the request back while
shutting down), it re-sends prompt + received tokens with the remaining budget to another
worker, up to `migration_limit` times, and drops any token it already has (frames carry
offsets). A worker that says it is draining gets the request routed elsewhere without
counting an attempt. Cancellation (the consumer closing this generator) is never migrated.

Disaggregated strategies: `decode-first` / `prefill-first` send the request to a decode /
prefill worker, which runs the other stage itself; `frontend` calls a prefill worker for a
KV handle, then a decode worker with it. A failed remote stage comes back as a retryable
"remote_failed" error and is migrated like any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import Counter

from segue.discovery import Instance
from segue.protocol import EngineRequest, Error, Final, HandBack, KvHandle, Prefilled, Tokens
from segue.router import Router
from segue.transport import CallFailed, call, client_timeout, drop_kv

log = logging.getLogger("segue.frontend")

STRATEGIES = ("none", "frontend", "decode-first", "prefill-first")
_FIRST_ROLE = {"none": "aggregated", "decode-first": "decode", "prefill-first": "prefill",
               "frontend": "decode"}


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

    def engine_request(self, phase: str = "generate", kv: KvHandle | None = None
                       ) -> EngineRequest:
        return EngineRequest(
            request_id=self.request_id, token_ids=self.prompt_ids + self.generated,
            max_tokens=self.max_tokens - len(self.generated), start_offset=len(self.generated),
            temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, phase=phase, kv=kv,
        )


class NoWorkerError(Exception):
    """No worker can take the request (503)."""


class MigrationError(Exception):
    """The request broke and could not be recreated (limit reached or no worker left)."""


class RejectedError(Exception):
    """A worker refused the request for a reason re-sending cannot fix."""


class _Failed(Exception):
    """One attempt failed. `exclude`: do not retry on that worker; `down`: take it out of
    rotation; `counted`: the retry counts against the migration limit."""

    def __init__(self, reason: str, inst: Instance | None, exclude: bool = True,
                 down: bool = True, counted: bool = True) -> None:
        self.reason, self.inst = reason, inst
        self.exclude, self.down, self.counted = exclude, down, counted


class Migrator:
    def __init__(
        self,
        router: Router,
        session: aiohttp.ClientSession,
        migrations_total: Counter,
        migration_limit: int = 3,
        stall_timeout: float = 5.0,
        strategy: str = "none",
        prefill_fallback: str = "none",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown disaggregation strategy {strategy!r}")
        self.router = router
        self.session = session
        self.migrations_total = migrations_total
        self.migration_limit = migration_limit
        self.timeout = client_timeout(stall_timeout)
        self.strategy = strategy
        self.prefill_fallback = prefill_fallback
        self.first_role = _FIRST_ROLE[strategy]

    def can_route(self) -> bool:
        """Whether some worker could take a new request now."""
        return bool(self.router.routable(self.first_role))

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
            try:
                # aclosing: if our consumer stops (cancel, stop string), the upstream
                # response is closed now, which cancels the call on the worker.
                async with contextlib.aclosing(self._attempt(g, exclude)) as stream:
                    async for item in stream:
                        yield item
                        if item[1] is not None:
                            return
            except CallFailed as e:
                f = _Failed(e.reason, e.instance)
            except _Failed as e:
                f = e
            if f.inst is not None:
                if f.exclude:
                    exclude.add(f.inst.id)
                if f.down:
                    self.router.mark_down(f.inst, f.reason)
            if not f.counted:
                continue
            if g.migrations >= self.migration_limit:
                log.error(
                    "Cannot recreate stream: migration limit %d reached (last failure: %s)",
                    self.migration_limit, f.reason,
                )
                raise MigrationError(
                    f"worker failed ({f.reason}) and the migration limit "
                    f"({self.migration_limit}) is reached"
                )
            g.migrations += 1
            self.migrations_total.labels(reason=f.reason).inc()
            log.warning(
                "Stream disconnected... recreating stream... request %s, worker %s, reason %s, "
                "%d tokens received, attempt %d/%d",
                g.request_id, f.inst.id if f.inst else "-", f.reason, len(g.generated),
                g.migrations, self.migration_limit,
            )

    def _pick(self, role: str, exclude: set[str], g: Generation) -> Instance:
        inst = self.router.pick((role,), exclude)
        if inst is None:
            if g.migrations:
                log.error("Cannot recreate stream: no worker available (role %s) for %s", role,
                          g.request_id)
                raise MigrationError(f"no worker available (role {role}) to continue the request")
            raise NoWorkerError(f"no worker available (role {role})")
        return inst

    async def _attempt(self, g: Generation, exclude: set[str]):
        if self.strategy != "frontend":
            inst = self._pick(self.first_role, exclude, g)
            async for item in self._tokens(inst, g, g.engine_request()):
                yield item
            return
        # Frontend-driven disaggregation: prefill here, then decode there with the handle.
        handle = await self._remote_prefill(g, exclude)
        if handle is None:  # no prefill worker; fallback: the decode worker does it all
            inst = self._pick("decode", exclude, g)
            async for item in self._tokens(inst, g, g.engine_request("local")):
                yield item
            return
        inst = self._pick("decode", exclude, g)
        pulled = False
        try:
            async for item in self._tokens(inst, g, g.engine_request("decode", handle)):
                pulled = True
                yield item
        finally:
            if not pulled:  # cancelled or failed before decoding: free the payload now
                asyncio.get_running_loop().create_task(
                    drop_kv(self.session, handle.url, handle.kv_id))

    async def _remote_prefill(self, g: Generation, exclude: set[str]) -> KvHandle | None:
        inst = self.router.pick(("prefill",), exclude)
        if inst is None:
            if self.prefill_fallback == "local":
                return None
            raise NoWorkerError("no prefill worker available (and no local prefill fallback)")
        try:
            async with contextlib.aclosing(
                call(self.session, inst, g.engine_request("prefill"), self.timeout)
            ) as frames:
                async for f in frames:
                    if type(f) is Prefilled:
                        return f.kv
                    self._check_error(f, inst)
        except CallFailed as e:
            raise _Failed("prefill_" + e.reason, inst) from None
        raise _Failed("prefill_stream_ended", inst)

    def _check_error(self, f, inst: Instance) -> None:
        """Turns a worker's HandBack/Error frame into the right exception."""
        if type(f) is HandBack:
            raise _Failed("drain", inst, down=False)
        if type(f) is Error:
            if f.code == "draining":  # routed elsewhere; not an attempt
                raise _Failed("draining", inst, down=False, counted=False)
            if f.code == "remote_failed":  # its peer failed; this worker is fine
                raise _Failed("remote_failed", inst, exclude=False, down=False)
            if f.code == "unavailable":
                raise NoWorkerError(f.message)
            if f.retryable:
                raise _Failed(f.code, inst)
            raise RejectedError(f.message)

    async def _tokens(self, inst: Instance, g: Generation, req: EngineRequest):
        generated = g.generated
        with self.router.track(inst):
            async with contextlib.aclosing(call(self.session, inst, req, self.timeout)) as fs:
                async for f in fs:
                    if type(f) is Tokens:
                        skip = len(generated) - f.offset
                        if skip < 0:
                            raise _Failed("token_gap", inst)  # never expected: protocol bug
                        new = f.token_ids[skip:] if skip else f.token_ids
                        if new:
                            generated.extend(new)
                            yield new, None
                    elif type(f) is Final:
                        yield [], f.finish_reason
                        return
                    else:
                        self._check_error(f, inst)
