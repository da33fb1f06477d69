"""Waiting on a condition inside the event loop, with a deadline (unit tier)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(
    cond: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
