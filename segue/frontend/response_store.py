"""The response store of the Responses API: each stored response's request, input items,
status, current object, output tokens and (for background responses) its streamed events,
reachable from every frontend process that names the same store (`ResponseStore`, made
from `--store` by stores.py): an SQLite file on one host (here) or Redis for several
(redis_store.py).

The embedded store is an SQLite file (WAL mode): every frontend process of one host opens
the same file, so a response created at one is read, resumed or cancelled at another, and
outlives the process that made it. Every change is one transaction; the owner of a running
background response (the frontend generating it) writes its events in batches, each batch
guarded by its ownership, so a response is never half-written and a frontend that lost it
(cancelled, or taken over after it stopped beating) writes nothing more. Responses expire
after `ttl` seconds and at most `max_responses` are kept (oldest out; both swept every
SWEEP_S at a create): bounded on disk.

SQLite is blocking: every call runs on one thread of the store's own, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    status TEXT NOT NULL,
    background INTEGER NOT NULL,
    request BLOB NOT NULL,
    input_items BLOB NOT NULL,
    response BLOB NOT NULL,
    tokens BLOB NOT NULL DEFAULT '[]',
    worker TEXT NOT NULL DEFAULT '',
    last_seq INTEGER NOT NULL DEFAULT -1,
    owner TEXT NOT NULL DEFAULT '',
    heartbeat REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires);
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (id, seq)
) WITHOUT ROWID;
"""


class Status(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def running(self) -> bool:
        return self in (Status.QUEUED, Status.IN_PROGRESS)


class StoreError(Exception):
    """The store cannot be reached or written: a 503 naming it."""


class Write(StrEnum):
    """What became of an owner's batch."""

    OK = "ok"
    LOST = "lost"  # cancelled, taken over, deleted or expired: stop generating


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    status: Status
    background: bool
    request: bytes  # the Responses body as received (JSON)
    input_items: bytes  # JSON list
    response: bytes  # the response object, as of the last write (JSON)
    tokens: bytes  # its output tokens as of the last write (a JSON list)
    worker: str  # the worker generating it, as of the last write (a taker attaches there)
    last_seq: int
    owner: str
    heartbeat: float


class ResponseStore(Protocol):
    """Every change is atomic; writes of a running response's owner are guarded by its
    ownership. Failures raise StoreError."""

    writes: int

    async def create(
        self,
        rid: str,
        request: bytes,
        input_items: bytes,
        response: bytes,
        status: Status,
        background: bool,
        owner: str,
    ) -> None: ...

    async def append(
        self,
        rid: str,
        owner: str,
        events: list[tuple[int, bytes]],
        response: bytes,
        status: Status,
        tokens: bytes,
        worker: str = "",
    ) -> Write: ...

    async def finish(self, rid: str, response: bytes, status: Status) -> None: ...

    async def claim(self, rid: str, owner: str, was: str, stale_after: float) -> bool:
        """Takes a running response over from `was`, if it still owns it and has not
        written for `stale_after` s; True if `owner` now owns it."""
        ...

    async def release(self, rid: str, owner: str) -> None: ...

    async def cancel(self, rid: str, response: Callable[[bytes], bytes]) -> Stored | None: ...

    async def delete(self, rid: str) -> bool: ...

    async def get(self, rid: str) -> Stored | None: ...

    async def events(self, rid: str, after: int) -> list[tuple[int, bytes]]: ...

    async def close(self) -> None: ...


MAX_RESPONSES = 100_000


SWEEP_S = 10.0  # expired and surplus responses are removed this often (at a create)


class SqliteStore:
    def __init__(
        self,
        path: str | Path,
        ttl: float,
        max_responses: int = MAX_RESPONSES,
        sweep_every: float = SWEEP_S,
    ) -> None:
        self.path = str(path)
        self.sweep_every = sweep_every
        self.ttl = ttl
        self.max_responses = max_responses
        self.writes = 0  # transactions that changed something, for tests and benchmarks
        self._next_sweep = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="response-store")
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                db.close()
                raise sqlite3.DatabaseError(
                    f"it holds schema {version}, this segue writes {SCHEMA_VERSION}: remove it"
                )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            with self._lock:
                try:
                    return fn(self._conn())
                except sqlite3.Error as e:
                    raise StoreError(f"the response store ({self.path}) failed: {e}") from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    @contextlib.contextmanager
    def _tx(self, db: sqlite3.Connection):
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        self.writes += 1

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                if self._db is not None:
                    self._db.close()
                    self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close)
        self._pool.shutdown(wait=False)

    # -- writes --------------------------------------------------------------------------

    async def create(
        self,
        rid: str,
        request: bytes,
        input_items: bytes,
        response: bytes,
        status: Status,
        background: bool,
        owner: str,
    ) -> None:
        now = time.time()

        def create(db: sqlite3.Connection) -> None:
            with self._tx(db):
                if now >= self._next_sweep:  # a scan: not on every create
                    self._next_sweep = now + self.sweep_every
                    self._expire(db, now)
                db.execute(
                    "INSERT INTO responses (id, created, expires, status, background, request,"
                    " input_items, response, owner, heartbeat) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (rid, now, now + self.ttl, status, int(background), request, input_items,
                     response, owner, now),
                )  # fmt: skip

        await self._run(create)

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        """Expired responses out, and the oldest beyond the bound."""
        db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM responses WHERE expires < ?)", (now,)
        )
        db.execute("DELETE FROM responses WHERE expires < ?", (now,))
        (n,) = db.execute("SELECT COUNT(*) FROM responses").fetchone()
        if n >= self.max_responses:
            old = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM responses ORDER BY created LIMIT ?",
                    (n - self.max_responses + 1,),
                )
            ]
            db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in old])
            db.executemany("DELETE FROM responses WHERE id = ?", [(i,) for i in old])

    async def append(
        self,
        rid: str,
        owner: str,
        events: list[tuple[int, bytes]],
        response: bytes,
        status: Status,
        tokens: bytes,
        worker: str = "",
    ) -> Write:
        """An owner's batch: its events, the response and its tokens as of them, its
        status, its worker; written only while `owner` still owns the running response."""
        now = time.time()

        def append(db: sqlite3.Connection) -> Write:
            with self._tx(db):
                row = db.execute(
                    "SELECT status, owner FROM responses WHERE id = ?", (rid,)
                ).fetchone()
                if row is None or row[1] != owner or not Status(row[0]).running:
                    return Write.LOST
                db.executemany(
                    "INSERT OR IGNORE INTO events (id, seq, data) VALUES (?,?,?)",
                    [(rid, s, d) for s, d in events],
                )
                last = events[-1][0] if events else None
                db.execute(
                    "UPDATE responses SET status = ?, response = ?, tokens = ?, worker = ?,"
                    " heartbeat = ?, last_seq = COALESCE(?, last_seq) WHERE id = ?",
                    (status, response, tokens, worker, now, last, rid),
                )
                return Write.OK

        return await self._run(append)

    async def finish(self, rid: str, response: bytes, status: Status) -> None:
        """A response that streams no events (not background) is done."""

        def finish(db: sqlite3.Connection) -> None:
            with self._tx(db):
                db.execute(
                    "UPDATE responses SET status = ?, response = ? WHERE id = ?",
                    (status, response, rid),
                )

        await self._run(finish)

    async def claim(self, rid: str, owner: str, was: str, stale_after: float) -> bool:
        """Takes over a running response from `was` if it still owns it and stopped beating
        `stale_after` s ago (died, or let it go at shutdown); True if `owner` now owns it."""
        now = time.time()

        def claim(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                cur = db.execute(
                    "UPDATE responses SET owner = ?, heartbeat = ? WHERE id = ? AND owner = ?"
                    " AND status IN ('queued', 'in_progress') AND heartbeat <= ?",
                    (owner, now, rid, was, now - stale_after),
                )
                return cur.rowcount == 1

        return await self._run(claim)

    async def release(self, rid: str, owner: str) -> None:
        """The owner lets its running response go (at shutdown): the next reader takes it
        over at once."""

        def release(db: sqlite3.Connection) -> None:
            with self._tx(db):
                db.execute(
                    "UPDATE responses SET heartbeat = 0 WHERE id = ? AND owner = ?", (rid, owner)
                )

        await self._run(release)

    async def cancel(self, rid: str, response: Callable[[bytes], bytes]) -> Stored | None:
        """Marks a running response cancelled (its owner stops at its next batch);
        `response` rewrites the stored object's status. A finished one is left as it is."""

        def cancel(db: sqlite3.Connection) -> Stored | None:
            with self._tx(db):
                got = _get(db, rid)
                if got is None or not got.status.running:
                    return got
                body = response(got.response)
                db.execute(
                    "UPDATE responses SET status = 'cancelled', response = ? WHERE id = ?",
                    (body, rid),
                )
                return _get(db, rid)

        return await self._run(cancel)

    async def delete(self, rid: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            with self._tx(db):
                db.execute("DELETE FROM events WHERE id = ?", (rid,))
                return db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount == 1

        return await self._run(delete)

    # -- reads ---------------------------------------------------------------------------

    async def get(self, rid: str) -> Stored | None:
        return await self._run(lambda db: _get(db, rid))

    async def events(self, rid: str, after: int) -> list[tuple[int, bytes]]:
        def events(db: sqlite3.Connection) -> list[tuple[int, bytes]]:
            return db.execute(
                "SELECT seq, data FROM events WHERE id = ? AND seq > ? ORDER BY seq", (rid, after)
            ).fetchall()

        return await self._run(events)


def _get(db: sqlite3.Connection, rid: str) -> Stored | None:
    row = db.execute(
        "SELECT id, status, background, request, input_items, response, tokens, worker,"
        " last_seq, owner, heartbeat FROM responses WHERE id = ? AND expires >= ?",
        (rid, time.time()),
    ).fetchone()
    if row is None:
        return None
    return Stored(
        row[0], Status(row[1]), bool(row[2]), row[3], row[4], row[5], row[6], row[7], row[8],
        row[9], row[10],
    )  # fmt: skip
