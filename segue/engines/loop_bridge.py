"""What an engine that runs on a thread of its own hands to the worker's event loop: each
step's tokens in one wake-up, and its KV events, in order."""

from __future__ import annotations

import asyncio

from segue.engines.base import KvEvents, RequestStream
from segue.protocol import Logprob


class LoopEvents:
    """A KV-event sink on the event loop, fed from the engine thread (in order)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: KvEvents) -> None:
        self.loop, self.events = loop, events

    def start(self, block_size: int, capacity: int, blocks: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.events.start, block_size, capacity, blocks)

    def stored(self, hashes: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.events.stored, hashes)

    def removed(self, hashes: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.events.removed, hashes)


def deliver(pushed: list[tuple[RequestStream, int, Logprob | None]]) -> None:
    for stream, tok, lp in pushed:
        stream.push(tok, lp)
