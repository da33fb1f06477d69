"""The response store a `--store` URL names (response_store.py, redis_store.py)."""

from __future__ import annotations

import os
import tempfile

from segue.frontend.redis_store import RedisStore
from segue.frontend.response_store import ResponseStore, SqliteStore


def open_store(url: str, ttl: float) -> ResponseStore:
    """`--store`: redis://HOST:PORT/DB, sqlite:PATH, or empty (an SQLite file in the
    temp directory)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, ttl)
    if url and not url.startswith("sqlite:"):
        raise ValueError(f"--store {url!r}: give redis://HOST:PORT/DB or sqlite:PATH")
    path = url.removeprefix("sqlite:").removeprefix("//")
    return SqliteStore(path or os.path.join(tempfile.gettempdir(), "segue-responses.sqlite3"), ttl)
