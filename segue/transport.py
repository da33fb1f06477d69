"""The caller's side of the request plane: one call to a worker, as a stream of frames,
over the multiplexed connection to that worker (segue.mux) or as one HTTP POST.

Every way a call can fail without the worker saying so (refused, reset, stalled past the
timeout, ended without a final frame) becomes a `Failure` (segue.failures) with its reason.
Closing the consumer before a final frame cancels the call on the worker (a CANCEL record,
or closing the HTTP response).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import msgspec

from segue.discovery import Instance
from segue.failures import Failure, FailureReason
from segue.mux_client import MuxPool
from segue.protocol import (
    EngineRequest,
    Error,
    Final,
    Frame,
    FrameParser,
    HandBack,
    PlaneKind,
    Prefilled,
    Route,
    encode_request,
)

_CONNECT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=2.0)

# A timer check that runs this much later than it was due means this process was not
# running (a paused VM, SIGSTOP, a host hiccup), not that the peer went quiet.
FROZEN_S = 1.0


class StallTimer:
    """Cancels the current task once it has waited on its peer `timeout` seconds without a
    byte. Unlike aiohttp's socket read timeout it forgives a freeze of this process: after
    one, the event loop may run due timers before it reads what the peer sent meanwhile,
    and every open call would be taken for a stall at once. A late check restarts the
    window instead, once until the peer is heard again: an overloaded loop whose every
    check is late must still find a hung peer."""

    def __init__(
        self,
        timeout: float,
        loop: asyncio.AbstractEventLoop | None = None,
        task: asyncio.Task[Any] | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        task = task or asyncio.current_task()
        assert task is not None, "a StallTimer guards the task that creates it"
        self.task = task
        self.timeout = timeout
        self.armed = False
        self.fired = False
        self.forgiven = False
        self.since = self.loop.time()
        self._due = self.since + timeout
        self._handle = self.loop.call_at(self._due, self._check) if math.isfinite(timeout) else None

    def arm(self) -> None:
        """Waiting on the peer from now (the only place the task may be cancelled)."""
        self.armed = True
        self.forgiven = False
        self.since = self.loop.time()

    def disarm(self) -> None:
        self.armed = False

    def _check(self) -> None:
        now = self.loop.time()
        if now - self._due > FROZEN_S and not self.forgiven:
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


_FINAL = (Final, Prefilled, HandBack, Error)


class RequestPlane:
    """A process's calls to workers: the HTTP session (also for KV pulls) and, for the mux
    plane, its connection per worker."""

    def __init__(
        self, session: aiohttp.ClientSession, kind: PlaneKind, stall_timeout: float
    ) -> None:
        self.session = session
        self.kind = kind
        self.mux = MuxPool(session, Route.MUX, stall_timeout)
        # requests whose calls this process lets go on without it when it closes them
        # (background responses at shutdown): DETACH, not CANCEL
        self.letting_go: set[str] = set()

    def frames(
        self, inst: Instance, req: EngineRequest, stall_timeout: float
    ) -> AsyncGenerator[Frame, None]:
        if self.kind is PlaneKind.HTTP:
            return stream_frames(self.session, inst, req, stall_timeout)
        return self._mux_frames(inst, req, stall_timeout)

    async def _mux_frames(
        self, inst: Instance, req: EngineRequest, stall_timeout: float
    ) -> AsyncGenerator[Frame, None]:
        stall = StallTimer(stall_timeout)
        conn = call = None
        done = False  # a final frame came: nothing to cancel
        try:
            stall.arm()
            conn = await self.mux.connection(inst.url)
            call = conn.open(encode_request(req))
            parser = FrameParser()
            while True:
                stall.arm()
                try:
                    data = await call.get()
                finally:
                    stall.disarm()
                if not data:
                    break
                for f in parser.feed(data):
                    if type(f) in _FINAL:
                        done = True
                    yield f
        except asyncio.CancelledError:
            if stall.fired and stall.task.uncancel() == 0:
                # A worker silent on every call is gone; one that still talks to other
                # calls has only lost this one.
                if conn is not None and conn.loop.time() - conn.last_heard >= stall_timeout:
                    conn.abort()
                raise Failure(FailureReason.STALL, inst) from None
            raise
        except Failure as e:
            e.instance = inst
            raise
        except aiohttp.ClientConnectorError:
            raise Failure(FailureReason.CONNECTION_REFUSED, inst) from None
        except aiohttp.WSServerHandshakeError as e:
            raise Failure(FailureReason.HTTP_ERROR, inst, f"HTTP {e.status}") from None
        except TimeoutError:
            raise Failure(FailureReason.STALL, inst) from None
        except (aiohttp.ClientError, ConnectionError):
            raise Failure(FailureReason.STREAM_BROKEN, inst) from None
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise Failure(FailureReason.BAD_FRAME, inst) from None
        finally:
            stall.close()
            if call is not None and conn is not None:
                if done:
                    conn.forget(call)
                elif req.detach and req.request_id in self.letting_go:
                    conn.detach(call)
                else:
                    conn.cancel(call)
        raise Failure(FailureReason.STREAM_ENDED, inst)

    async def close(self) -> None:
        await self.mux.close()


async def stream_frames(
    session: aiohttp.ClientSession, inst: Instance, req: EngineRequest, stall_timeout: float
) -> AsyncGenerator[Frame, None]:
    """Yields the worker's frames; the consumer stops at a final frame. Reaching the end of
    the body means the stream broke before its end."""
    stall = StallTimer(stall_timeout)
    try:
        stall.arm()
        async with session.post(
            inst.url + Route.GENERATE, data=encode_request(req), timeout=_CONNECT_TIMEOUT
        ) as resp:
            if resp.status != 200:
                raise Failure(FailureReason.HTTP_ERROR, inst, f"HTTP {resp.status}")
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
            raise Failure(FailureReason.STALL, inst) from None
        raise
    except aiohttp.ClientConnectorError:
        raise Failure(FailureReason.CONNECTION_REFUSED, inst) from None
    except TimeoutError:
        raise Failure(FailureReason.STALL, inst) from None
    except aiohttp.ClientError:
        raise Failure(FailureReason.STREAM_BROKEN, inst) from None
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise Failure(FailureReason.BAD_FRAME, inst) from None
    finally:
        stall.close()
    raise Failure(FailureReason.STREAM_ENDED, inst)


async def pull_kv(
    session: aiohttp.ClientSession, url: str, kv_id: str, stall_timeout: float
) -> bytes:
    """Pull a KV payload from the worker that holds it (which then frees it)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=stall_timeout)
    try:
        async with session.get(url + Route.kv(kv_id), timeout=timeout) as resp:
            if resp.status != 200:
                raise Failure(FailureReason.HTTP_ERROR, None, f"KV pull: HTTP {resp.status}")
            return await resp.read()
    except aiohttp.ClientConnectorError:
        raise Failure(FailureReason.CONNECTION_REFUSED, None, "KV pull refused") from None
    except TimeoutError:
        raise Failure(FailureReason.STALL, None, "KV pull stalled") from None
    except aiohttp.ClientError:
        raise Failure(FailureReason.STREAM_BROKEN, None, "KV pull broken") from None


async def drop_kv(session: aiohttp.ClientSession, url: str, kv_id: str) -> None:
    """Best effort: tell the holder a payload will never be pulled."""
    try:
        async with session.delete(url + Route.kv(kv_id), timeout=aiohttp.ClientTimeout(total=2)):
            pass
    except (aiohttp.ClientError, TimeoutError):
        pass  # the holder's TTL frees it anyway


def drop_kv_soon(session: aiohttp.ClientSession, url: str, kv_id: str) -> None:
    """`drop_kv` without waiting: for a caller that is being cancelled."""
    task = asyncio.get_running_loop().create_task(drop_kv(session, url, kv_id))
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()
