"""Request bookkeeping shared by the engines that schedule themselves (mocker, hf).

A FIFO waiting queue, the running set, and a pool of KV blocks: a request reserves blocks for
its prompt + max_tokens when it is admitted (its prompt only, for a prefill) and gives them
back when it finishes or is aborted. A finished prefill's blocks stay reserved under a key,
with whatever the engine needs to export its KV, until the KV is pulled or dropped.

With prefix caching, full blocks keep their content after their sequence ends, named by
chained hashes (segue.blocks), in an LRU of free-but-cached blocks that are reused by a later
prompt with the same prefix and evicted only when their space is needed, as vLLM does. What
becomes cached and what is evicted is reported to `events` (the worker publishes it to the
frontends' KV indexes). Blocks are physical: a sequence's `kv.ids` are the pool's block ids
of its positions in order (the hf engine's block table; the mocker only counts them).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from typing import Any

from segue.blocks import ROOT, block_hashes
from segue.engines.base import (
    EngineInput,
    EngineRequestError,
    EngineStats,
    EngineTask,
    KvEvents,
)


class SeqTable:
    """Sequences are engine objects with `req` (EngineInput) and `blocks` attributes; the
    table adds `kv` (a `SeqBlocks`)."""

    def __init__(
        self,
        kv_blocks: int,
        block_size: int,
        max_num_seqs: int,
        prefix_caching: bool = False,
        events: KvEvents | None = None,
    ) -> None:
        self.total = kv_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.prefix_caching = prefix_caching
        self.events = events
        # Blocks with no content and no owner: those given back, and every id from
        # `_fresh` up (never handed out; a counter, not a list, so an idle engine of a
        # simulated fleet holds no list of its whole pool).
        self.free_ids: list[int] = []
        self._fresh = 0
        self.cache: dict[int, int] = {}  # block hash -> sequences using it
        self.block_of: dict[int, int] = {}  # block hash -> the block holding it
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached and unused, oldest first
        self.seqs: dict[str, Any] = {}
        self.waiting: deque[Any] = deque()
        self.running: dict[str, Any] = {}
        self.held: dict[str, tuple[Any, Any]] = {}

    @property
    def unused(self) -> int:
        return len(self.free_ids) + self.total - self._fresh

    @property
    def free(self) -> int:
        """Blocks a new sequence can have (cached-but-unused ones are evicted for it)."""
        return self.unused + len(self.lru)

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

    def add(self, seq: Any, reuse: bool = True) -> None:
        """Queues a sequence; `reuse`: its prompt may start from cached blocks (not when
        its KV comes from elsewhere, or every prompt position's logits are wanted)."""
        hashes = block_hashes(seq.req.token_ids, self.block_size) if self.prefix_caching else []
        seq.kv = SeqBlocks(hashes)
        seq.kv.reuse = reuse
        self.seqs[seq.req.request_id] = seq
        self.waiting.append(seq)

    def _hits(self, seq: Any) -> list[int]:
        """The longest cached prefix of the prompt, in blocks; the last prompt token is
        always computed (its logits make the first token), as in vLLM."""
        usable = (len(seq.req.token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in seq.kv.prompt[:usable]:
            if h not in self.cache:
                break
            hits.append(h)
        return hits

    def admit(self) -> list[Any]:
        """Moves waiting sequences to running, in order, while slots and blocks last."""
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._hits(seq) if self.prefix_caching and seq.kv.reuse else []
            reusable = sum(1 for h in hits if self.cache[h] == 0)  # in the LRU: not free
            need = seq.blocks - len(hits)
            if need > self.free - reusable:
                break
            self.waiting.popleft()
            for h in hits:
                self._ref(h)
            seq.kv.ids = [self.block_of[h] for h in hits] + self._take(need)
            seq.kv.refs = hits
            seq.kv.own = need
            seq.kv.cached_tokens = len(hits) * self.block_size
            self.running[seq.req.request_id] = seq
            admitted.append(seq)
        return admitted

    def _ref(self, h: int) -> None:
        if self.cache[h] == 0:
            del self.lru[h]
        self.cache[h] += 1

    def _take(self, n: int) -> list[int]:
        """`n` blocks for new content: unused ones first, then the least recently used
        cached ones, evicted."""
        from_unused = min(n, self.unused)
        back = min(from_unused, len(self.free_ids))
        ids = [self.free_ids.pop() for _ in range(back)]
        fresh = from_unused - back
        ids += range(self._fresh, self._fresh + fresh)
        self._fresh += fresh
        evicted = [self.lru.popitem(last=False)[0] for _ in range(n - from_unused)]
        for h in evicted:
            del self.cache[h]
            ids.append(self.block_of.pop(h))
        if evicted and self.events is not None:
            self.events.removed(evicted)
        return ids

    def computed(self, seq: Any, token_ids: list[int]) -> None:
        """The KV of `token_ids` (the sequence's context so far) is in the sequence's
        blocks: its full blocks become cached content, named by their hashes."""
        if not self.prefix_caching:
            return
        kv: SeqBlocks = seq.kv
        bs = self.block_size
        full = len(token_ids) // bs
        start = len(kv.refs)
        if full <= start:
            return
        known = kv.prompt
        if len(known) < full:  # generated tokens filled more blocks: hashed once each
            parent = known[-1] if known else ROOT
            known += block_hashes(token_ids[len(known) * bs : full * bs], bs, parent)
        stored = []
        for i in range(start, full):
            if kv.own == 0:
                break
            h = known[i]
            if h in self.cache:  # computed meanwhile by another sequence: share theirs
                self._ref(h)
                self.free_ids.append(kv.ids[i])
                kv.ids[i] = self.block_of[h]  # same content: the next step reads theirs
            else:
                self.cache[h] = 1
                self.block_of[h] = kv.ids[i]
                stored.append(h)
            kv.refs.append(h)
            kv.own -= 1
        if stored and self.events is not None:
            self.events.stored(stored)

    def _release(self, seq: Any) -> None:
        kv: SeqBlocks = seq.kv
        for h in kv.refs:
            self.cache[h] -= 1
            if self.cache[h] == 0:
                self.lru[h] = None
        self.free_ids.extend(kv.ids[len(kv.refs) :])
        kv.refs, kv.own, kv.ids = [], 0, []

    def remove(self, seq: Any) -> None:
        """A sequence is over (finished or aborted): its blocks go back to the pool."""
        rid = seq.req.request_id
        self.seqs.pop(rid, None)
        if self.running.pop(rid, None) is not None:
            self._release(seq)
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
        self.held[key] = (seq, kv)
        return key

    def release(self, key: str) -> bool:
        entry = self.held.pop(key, None)
        if entry is None:
            return False
        self._release(entry[0])
        return True

    def cached_hashes(self) -> list[int]:
        """Every block with cached content (for a KV-event snapshot)."""
        return list(self.cache)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=len(self.waiting),
            kv_blocks_used=self.total - self.free,
            kv_blocks_total=self.total,
            held=len(self.held),
            block_size=self.block_size,
        )


class SeqBlocks:
    """One sequence's blocks: cached ones it uses (by hash) and its own others."""

    __slots__ = ("prompt", "refs", "own", "ids", "cached_tokens", "reuse")

    def __init__(self, prompt: list[int]) -> None:
        # hashes of the prompt's full blocks (prefix caching only), then of the blocks its
        # generated tokens fill, as they fill
        self.prompt = prompt
        self.refs: list[int] = []  # cached blocks it uses: its first len(refs) blocks
        self.own = 0  # blocks of its own after those
        self.ids: list[int] = []  # the pool's block ids of all its blocks, in order
        self.cached_tokens = 0
        self.reuse = True
