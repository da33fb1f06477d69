"""The caller's side of the request plane: one call to a worker, as a stream of frames.

Every way a call can fail without the worker saying so (refused, reset, stalled past the
timeout, ended without a final frame) becomes `CallFailed` with a short reason, which is
what migration and remote-stage retries key on. Cancelling the consumer closes the HTTP
response, which cancels the call on the worker.
"""

from __future__ import annotations

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


async def call(
    session: aiohttp.ClientSession, inst: Instance, req: EngineRequest,
    timeout: aiohttp.ClientTimeout,
) -> AsyncIterator[Frame]:
    """Yields the worker's frames; the consumer stops at a final frame. Reaching the end of
    the body means the stream broke before its end."""
    try:
        async with session.post(
            inst.url + GENERATE_PATH, data=encode_request(req), timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise CallFailed(f"http_{resp.status}", inst)
            parser = FrameParser()
            async for chunk in resp.content.iter_any():
                for f in parser.feed(chunk):
                    yield f
    except aiohttp.ClientConnectorError:
        raise CallFailed("connection_refused", inst) from None
    except TimeoutError:
        raise CallFailed("stall", inst) from None
    except aiohttp.ClientError:
        raise CallFailed("stream_broken", inst) from None
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise CallFailed("bad_frame", inst) from None  # not a segue worker, or a bug
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
