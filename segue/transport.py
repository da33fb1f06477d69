"""The caller's side of the request plane: one call to a worker, as a stream of frames.

Every way a call can fail without the worker saying so (refused, reset, stalled past the
timeout, ended without a final frame) becomes `CallFailed` with a short reason, which is
what migration and remote-stage retries key on. Cancelling the consumer closes the HTTP
response, which cancels the call on the worker.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from segue.discovery import Instance
from segue.protocol import GENERATE_PATH, EngineRequest, Frame, FrameParser, encode_request


class CallFailed(Exception):
    def __init__(self, reason: str, instance: Instance | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.instance = instance


def client_timeout(stall_timeout: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=stall_timeout)


# A timer check that runs this much later than it was due means this process was not
# running (a paused VM, SIGSTOP, a host hiccup), not that the peer went quiet.
_FROZEN_S = 1.0


class _StallTimer:
    """Cancels the current task once it has waited on its peer `timeout` seconds without a
    byte. Unlike aiohttp's socket read timeout it forgives a freeze of this process: after
    one, the event loop may run due timers before it reads what the peer sent meanwhile,
    and every open call would be taken for a stall at once. A late check restarts the
    window instead, once until the peer is heard again: an overloaded loop whose every
    check is late must still find a hung peer."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = timeout
        self.armed = False
        self.fired = False
        self.forgiven = False
        self.since = self.loop.time()
        self._due = self.since + timeout
        self._handle = (self.loop.call_at(self._due, self._check) if math.isfinite(timeout)
                        else None)

    def arm(self) -> None:
        """Waiting on the peer from now (the only place the task may be cancelled)."""
        self.armed = True
        self.forgiven = False
        self.since = self.loop.time()

    def disarm(self) -> None:
        self.armed = False

    def _check(self) -> None:
        now = self.loop.time()
        if now - self._due > _FROZEN_S and not self.forgiven:
            self.since, self.forgiven = now, True
        if self.armed and now - self.since >= self.timeout:
            self.fired = True
            self.task.cancel()
            return
        self._due = (self.since if self.armed else now) + self.timeout
        self._handle = self.loop.call_at(self._due, self._check)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def call(
    session: aiohttp.ClientSession, inst: Instance, req: EngineRequest,
    timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[Frame]:
    """Yields the worker's frames; the consumer stops at a final frame. Reaching the end of
    the body means the stream broke before its end."""
    stall = _StallTimer(timeout.sock_read or math.inf)
    try:
        stall.arm()
        async with session.post(
            inst.url + GENERATE_PATH, data=encode_request(req),
            timeout=aiohttp.ClientTimeout(total=timeout.total, sock_connect=timeout.sock_connect),
        ) as resp:
            if resp.status != 200:
                raise CallFailed(f"http_{resp.status}", inst)
            parser = FrameParser()
            chunks = resp.content.iter_any()
            while True:
                stall.arm()  # only while waiting on the worker, not while our caller works
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    stall.disarm()
                for f in parser.feed(chunk):
                    yield f
    except asyncio.CancelledError:
        if stall.fired and stall.task.uncancel() == 0:
            raise CallFailed("stall", inst) from None
        raise
    except aiohttp.ClientConnectorError:
        raise CallFailed("connection_refused", inst) from None
    except TimeoutError:
        raise CallFailed("stall", inst) from None
    except aiohttp.ClientError:
        raise CallFailed("stream_broken", inst) from None
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise CallFailed("bad_frame", inst) from None  # not a segue worker, or a bug
    finally:
        stall.close()
    raise CallFailed("stream_ended", inst)


async def fetch_kv(session: aiohttp.ClientSession, url: str, kv_id: str,
                   timeout: aiohttp.ClientTimeout) -> bytes:
    """Pull a KV payload from the worker that holds it (which then frees it)."""
    try:
        async with session.get(f"{url}/kv/{kv_id}", timeout=timeout) as resp:
            if resp.status != 200:
                raise CallFailed(f"kv_{resp.status}")
            return await resp.read()
    except aiohttp.ClientConnectorError:
        raise CallFailed("kv_connection_refused") from None
    except TimeoutError:
        raise CallFailed("kv_stall") from None
    except aiohttp.ClientError:
        raise CallFailed("kv_broken") from None


async def drop_kv(session: aiohttp.ClientSession, url: str, kv_id: str) -> None:
    """Best effort: tell the holder a payload will never be pulled."""
    try:
        async with session.delete(f"{url}/kv/{kv_id}", timeout=aiohttp.ClientTimeout(total=2)):
            pass
    except (aiohttp.ClientError, TimeoutError):
        pass  # the holder's TTL frees it anyway
