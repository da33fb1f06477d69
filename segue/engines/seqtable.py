"""Request bookkeeping shared by the engines that schedule themselves (mocker, hf).

A FIFO waiting queue, the running set, and a pool of KV blocks: a request reserves blocks for
its prompt + max_tokens when it is admitted (its prompt only, for a prefill) and gives them
back when it finishes or is aborted. A finished prefill's blocks stay reserved under a key,
with whatever the engine needs to export its KV, until the KV is pulled or dropped.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any

from segue.engines.base import EngineInput, EngineRequestError, EngineStats, EngineTask


class SeqTable:
    """Sequences are engine objects with `req` (EngineInput) and `blocks` attributes."""

    def __init__(self, kv_blocks: int, block_size: int, max_num_seqs: int) -> None:
        self.total = kv_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.free = kv_blocks
        self.seqs: dict[str, Any] = {}
        self.waiting: deque[Any] = deque()
        self.running: dict[str, Any] = {}
        self.held: dict[str, tuple[int, Any]] = {}

    def blocks_for(self, req: EngineInput) -> int:
        """Blocks the request will reserve; refuses what can never run."""
        if req.request_id in self.seqs:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        new_tokens = 0 if req.task is EngineTask.PREFILL else req.max_tokens
        blocks = -(-(len(req.token_ids) + new_tokens) // self.block_size)
        if blocks > self.total:
            raise EngineRequestError(
                f"request needs {blocks} KV blocks, the engine has {self.total}"
            )
        return blocks

    def add(self, seq: Any) -> None:
        self.seqs[seq.req.request_id] = seq
        self.waiting.append(seq)

    def admit(self) -> list[Any]:
        """Moves waiting sequences to running, in order, while slots and blocks last."""
        admitted = []
        while (
            self.waiting
            and len(self.running) < self.max_num_seqs
            and self.waiting[0].blocks <= self.free
        ):
            seq = self.waiting.popleft()
            self.free -= seq.blocks
            self.running[seq.req.request_id] = seq
            admitted.append(seq)
        return admitted

    def remove(self, seq: Any) -> None:
        """A sequence is over (finished or aborted): its blocks go back to the pool."""
        rid = seq.req.request_id
        self.seqs.pop(rid, None)
        if self.running.pop(rid, None) is not None:
            self.free += seq.blocks
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass

    def hold(self, seq: Any, kv: Any) -> str:
        """A prefill is done: keep its blocks (and `kv`) under a new key."""
        rid = seq.req.request_id
        self.seqs.pop(rid, None)
        self.running.pop(rid, None)
        key = f"{rid}.{uuid.uuid4().hex[:8]}"
        self.held[key] = (seq.blocks, kv)
        return key

    def release(self, key: str) -> bool:
        entry = self.held.pop(key, None)
        if entry is None:
            return False
        self.free += entry[0]
        return True

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_blocks_used=self.total - self.free,
            kv_blocks_total=self.total,
            held=len(self.held),
        )
