"""File-directory discovery: one JSON file per instance under DIR/<namespace>/.

A worker rewrites its file every ttl/3 (atomic rename) with a new expiry; a watcher polls
the directory, ignores (and removes) files past their expiry, and treats an instance on
this host whose PID is gone as dead at once, without waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from segue.discovery.base import Discovery, Instance, Lease

log = logging.getLogger("segue.discovery")
POLL_INTERVAL = 0.05


class _Record(msgspec.Struct):
    instance: Instance
    expires_at: float


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(_Record)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


class _FileLease(Lease):
    def __init__(self, path: Path, instance: Instance, ttl: float) -> None:
        self.path, self.instance, self.ttl = path, instance, ttl
        self._task: asyncio.Task | None = None

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(_enc.encode(_Record(self.instance, time.time() + self.ttl)))
        os.replace(tmp, self.path)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                self.write()
            except OSError as e:  # a full disk must not kill the worker; the TTL decides
                log.warning("lease renewal failed: %s", e)

    def start(self) -> None:
        self.write()
        self._task = asyncio.create_task(self._renew(), name="lease-renew")

    async def revoke(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FileDiscovery(Discovery):
    def __init__(self, directory: str, namespace: str) -> None:
        self.dir = Path(directory) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()

    async def register(self, instance: Instance, ttl: float) -> Lease:
        lease = _FileLease(self.dir / f"{instance.id}.json", instance, ttl)
        lease.start()
        return lease

    def snapshot(self) -> dict[str, Instance]:
        now = time.time()
        live: dict[str, Instance] = {}
        for path in self.dir.glob("*.json"):
            try:
                rec = _dec.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # vanished or half-written by another tool: skip this round
            inst = rec.instance
            dead = rec.expires_at < now or (inst.host == self.host and not pid_alive(inst.pid))
            if dead:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            live[inst.id] = inst
        return live

    async def watch(self) -> AsyncIterator[dict[str, Instance]]:
        last: dict[str, Instance] | None = None
        while True:
            current = self.snapshot()
            if current != last:
                last = current
                yield dict(current)
            await asyncio.sleep(POLL_INTERVAL)
