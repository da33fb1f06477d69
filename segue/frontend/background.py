"""Background responses of the Responses API: the ones this frontend process owns
(generates, whatever their clients do), how their events reach the store and local
followers, how a follower reads a response owned elsewhere, and the take-over of one whose
owner went silent.

The owner writes a response's events to the store in batches (every BATCH_S at most, and at
least every BEAT_S as a heartbeat) with its tokens, each write guarded by its ownership. A
frontend asked about a running response whose owner is gone (a dead pid on this host), let
it go at shutdown or has not written for STALE_S claims it in the store (one transaction:
one frontend wins) and goes on from its stored tokens: the events are a function of the
request and its tokens, so a builder replaying them makes the stored events again, number
for number; the new owner writes those after the last stored one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import Protocol, TypeVar

import msgspec

from segue.frontend.metrics import FrontendMetrics
from segue.frontend.preprocess import PreparedRequest
from segue.frontend.response_events import TERMINAL, ResponseEvents
from segue.frontend.response_store import ResponseStore, Status, Stored, StoreError, Write
from segue.log import request_id_var

log = logging.getLogger("segue.frontend")

BATCH_S = 0.05  # events wait at most this long before their batch is written
BEAT_S = 0.5  # an owner writes at least this often, events or none
STALE_S = 3.0  # an owner silent this long has died or let go: take the response over
POLL_S = 0.02  # a follower of a response owned elsewhere reads the store this often
FINAL_TRIES = 20  # a response's last batch is given up after this many failed writes

Event = tuple[int, str, bytes]  # sequence number, type, JSON
T = TypeVar("T")


class Source(Protocol):
    """What generates a response (the Responses endpoint)."""

    def events(
        self, prep: PreparedRequest, builder: ResponseEvents
    ) -> AsyncGenerator[list[Event], None]: ...

    async def restart(self, stored: Stored) -> tuple[PreparedRequest, ResponseEvents]:
        """The prepared request and a fresh builder of a stored running response."""
        ...

    async def store_op(self, op: Awaitable[T]) -> T: ...

    async def get(self, rid: str) -> Stored: ...


class Running:
    """A background response this process owns: its events so far, for local followers
    (who see the terminal event only once it is stored, so a client that saw the end
    finds the finished response at any frontend)."""

    def __init__(self, builder: ResponseEvents) -> None:
        self.builder = builder
        self.events: list[Event] = []
        self.visible = 0  # events local followers may read
        self.task: asyncio.Task[None] | None = None
        self.generated = False  # the last event is made: the writer writes it and stops
        self.ended = False  # done, failed, cancelled or let go: followers stop
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, events: list[Event], visible: bool = True) -> None:
        self.events += events
        if visible:
            self.visible = len(self.events)
        self._notify()

    def end(self) -> None:
        self.visible = len(self.events)
        self.ended = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    async def changed(self) -> None:
        await asyncio.shield(self._changed)


class Background:
    def __init__(self, store: ResponseStore, metrics: FrontendMetrics, source: Source) -> None:
        self.store = store
        self.metrics = metrics
        self.source = source
        # this process, as the store knows its responses: its host and pid tell a frontend
        # of the same host at once that it died
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self.running: dict[str, Running] = {}

    def stop(self, rid: str) -> None:
        """Stops generating `rid` here at once (cancelled or deleted)."""
        running = self.running.get(rid)
        if running is not None and running.task is not None:
            running.task.cancel()

    async def detach_all(self, letting_go: set[str]) -> None:
        """At the drain deadline: let every background response this process owns go. Its
        worker keeps generating (the request plane says DETACH, not CANCEL, for the ids in
        `letting_go`), and a client resuming at another frontend has it taken over at once,
        attached there."""
        tasks = []
        for rid, running in list(self.running.items()):
            letting_go.add(rid)
            if running.task is not None:
                running.task.cancel()
                tasks.append(running.task)
            running.end()
        await asyncio.gather(*tasks, return_exceptions=True)
        for rid in letting_go:
            with contextlib.suppress(StoreError):
                await self.store.release(rid, self.owner)
            self.metrics.response_detaches.inc()
            log.info("Detached Response ID: %s (frontend stopping)", rid)

    def own(
        self, rid: str, prep: PreparedRequest, builder: ResponseEvents, stored_last: int
    ) -> Running:
        """Generates a background response in this process, whatever its clients do."""
        running = Running(builder)
        self.running[rid] = running
        running.task = asyncio.create_task(self._generate(rid, prep, running, stored_last))
        return running

    async def _generate(
        self, rid: str, prep: PreparedRequest, running: Running, stored_last: int
    ) -> None:
        request_id_var.set(rid)
        writer = asyncio.create_task(self._writer(rid, running, prep, stored_last))
        try:
            async with contextlib.aclosing(self.source.events(prep, running.builder)) as gen:
                async for batch in gen:
                    running.add(batch, visible=not running.builder.done)
            running.generated = True
            running.add([], visible=False)  # wakes the writer
            await writer  # the last batch written
        finally:
            writer.cancel()
            running.end()
            if self.running.get(rid) is running:
                del self.running[rid]

    async def _writer(
        self, rid: str, running: Running, prep: PreparedRequest, stored_last: int
    ) -> None:
        """Writes the owner's events in batches (every BATCH_S at most, at least every
        BEAT_S) until the response ends; stops the generation if the store says the
        response is no longer ours (cancelled, deleted, taken over). A failed write is
        tried again with the next batch; the last one at most FINAL_TRIES times."""
        written = stored_last
        builder = running.builder
        tries = 0
        while True:
            last = running.generated
            new = running.events[written + 1 :]
            try:
                result = await self.store.append(
                    rid, self.owner, [(s, d) for s, _, d in new], builder.encoded(),
                    builder.status, msgspec.json.encode(builder.tokens), prep.state.worker,
                )  # fmt: skip
            except StoreError as e:
                self.metrics.store_errors.inc()
                log.error("Response ID: %s: %s", rid, e)
                tries += last
                if tries >= FINAL_TRIES:
                    return
            else:
                if new:
                    written = new[-1][0]
                if result is Write.LOST:
                    log.info("Response ID: %s is no longer this frontend's: stopping", rid)
                    if running.task is not None:
                        running.task.cancel()
                    return
                if last:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BEAT_S):
                    await running.changed()
                    if not running.generated:
                        await asyncio.sleep(BATCH_S)  # let a batch gather

    async def follow_local(self, running: Running, after: int) -> AsyncGenerator[list[Event], None]:
        i = after + 1
        while True:
            if i < running.visible:
                batch = running.events[i : running.visible]
                i += len(batch)
                yield batch
                continue
            if running.ended:
                return
            await running.changed()

    async def follow(self, stored: Stored, after: int) -> AsyncGenerator[list[Event], None]:
        """Events after `after` of a background response, to its end: from this process if
        it owns it, else from the store (taking it over if its owner went silent)."""
        rid = stored.id
        while True:
            running = self.running.get(rid)
            if running is not None:
                async with contextlib.aclosing(self.follow_local(running, after)) as local:
                    async for batch in local:
                        after = batch[-1][0]
                        yield batch
                if running.builder.done or running.builder.status is Status.CANCELLED:
                    return
                stored = await self.source.get(rid)  # let go, or lost: read on from the store
            rows = await self.source.store_op(self.store.events(rid, after))
            if rows:
                batch = [(s, _kind(d), d) for s, d in rows]
                after = rows[-1][0]
                yield batch
                if batch[-1][1] in TERMINAL:
                    return
                continue
            stored = await self.source.get(rid)
            if not stored.status.running:
                if stored.last_seq <= after:
                    return
                continue
            if not await self.take_over_if_stale(stored):
                await asyncio.sleep(POLL_S)

    async def take_over_if_stale(self, stored: Stored) -> bool:
        """Claims a running response whose owner went silent and goes on with it here
        from its stored tokens; True if this process owns it now."""
        if stored.id in self.running:
            return True
        gone = owner_gone(stored.owner)
        if not gone and time.time() - stored.heartbeat < STALE_S:
            return False
        claim = self.store.claim(stored.id, self.owner, stored.owner, 0 if gone else STALE_S)
        if not await self.source.store_op(claim):
            return False
        stored = await self.source.get(stored.id)  # as its last owner left it
        prep, builder = await self.source.restart(stored)
        self.own(stored.id, prep, builder, stored_last=stored.last_seq)
        self.metrics.response_takeovers.inc()
        log.info("Took over Response ID: %s after event %d", stored.id, stored.last_seq)
        return True


def owner_gone(owner: str) -> bool:
    """Whether the frontend process `owner` is known dead: on this host, its pid is gone.
    (On another host only its silence tells: STALE_S.)"""
    host, pid, _ = (owner.split("/", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _kind(data: bytes) -> str:
    return str(msgspec.json.decode(data)["type"])
