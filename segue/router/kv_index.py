"""The frontend's index of which worker caches which KV blocks, built from the workers' KV
events (segue.worker.kv_events), for `--router kv`.

Blocks are named by chained hashes (segue.blocks), so one hash stands for a whole prefix and
the index needs no tree: `holders` maps a block hash to a bit mask of the workers that cache
it, and a request's cached prefix on a worker is the run of its block hashes, from the first,
that carry the worker's bit. Memory is bounded by what the workers hold: a worker's blocks
never exceed its cache's capacity (its snapshot says how many blocks it has; an index that
grows past that has missed removals and resyncs), and a worker that leaves takes its blocks
with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from segue.blocks import block_hashes
from segue.protocol import KvEvents, KvSnapshot

log = logging.getLogger("segue.router")


@dataclass
class _Worker:
    bit: int
    block_size: int
    capacity: int
    seq: int
    blocks: set[int] = field(default_factory=set)


class KvIndex:
    def __init__(self) -> None:
        self.holders: dict[int, int] = {}  # block hash -> bit mask of workers
        self.workers: dict[str, _Worker] = {}
        self._names: dict[int, str] = {}  # bit -> worker id
        self._sizes: dict[int, int] = {}  # block size -> bit mask of the workers with it
        self._free_bits: list[int] = []
        self._next_bit = 0

    @property
    def size(self) -> int:
        """(worker, block) pairs indexed."""
        return sum(len(w.blocks) for w in self.workers.values())

    def snapshot(self, wid: str, snap: KvSnapshot) -> None:
        """A worker's whole cache (on connect, or after a gap)."""
        self.remove(wid)
        if self._free_bits:
            bit = self._free_bits.pop()
        else:
            bit, self._next_bit = self._next_bit, self._next_bit + 1
        w = _Worker(bit, snap.block_size, snap.capacity, snap.seq)
        self.workers[wid] = w
        self._names[bit] = wid
        self._sizes[w.block_size] = self._sizes.get(w.block_size, 0) | 1 << bit
        self._store(w, snap.blocks)

    def apply(self, wid: str, ev: KvEvents) -> bool:
        """One batch of a worker's events; False when the batch does not follow the last
        one seen (or the worker's blocks outgrow its cache): resync from a snapshot."""
        w = self.workers.get(wid)
        if w is None:
            return False
        if ev.seq <= w.seq:
            return True  # already covered by the snapshot
        if ev.seq != w.seq + 1:
            log.warning("KV events of %s: gap (%d after %d), resyncing", wid, ev.seq, w.seq)
            return False
        w.seq = ev.seq
        if ev.removed:
            mask = ~(1 << w.bit)
            holders = self.holders
            for h in ev.removed:
                if h in w.blocks:
                    w.blocks.discard(h)
                    left = holders[h] & mask
                    if left:
                        holders[h] = left
                    else:
                        del holders[h]
        if ev.stored:
            self._store(w, ev.stored)
        if len(w.blocks) > w.capacity:
            log.warning("KV events of %s: more blocks than its cache holds, resyncing", wid)
            return False
        return True

    def _store(self, w: _Worker, hashes: list[int]) -> None:
        bit = 1 << w.bit
        holders = self.holders
        for h in hashes:
            holders[h] = holders.get(h, 0) | bit
        w.blocks.update(hashes)

    def remove(self, wid: str) -> None:
        """A worker left (or its event stream broke): its blocks leave the index."""
        w = self.workers.pop(wid, None)
        if w is None:
            return
        mask = ~(1 << w.bit)
        del self._names[w.bit]
        left = self._sizes[w.block_size] & mask
        if left:
            self._sizes[w.block_size] = left
        else:
            del self._sizes[w.block_size]
        holders = self.holders
        for h in w.blocks:
            left = holders[h] & mask
            if left:
                holders[h] = left
            else:
                del holders[h]
        self._free_bits.append(w.bit)

    def overlap(self, token_ids: list[int], wids: list[str]) -> dict[str, int]:
        """For each of `wids`, how many leading tokens of `token_ids` it caches."""
        cached = self.cached(token_ids)
        return {w: cached.get(w, 0) for w in wids}

    def cached(self, token_ids: list[int]) -> dict[str, int]:
        """How many leading tokens of `token_ids` each worker caches, for the workers that
        cache any: the work is the prompt's blocks and the workers that hold them, never a
        pass over every worker (one bit mask stands for all of them)."""
        out: dict[str, int] = {}
        holders = self.holders
        for bs, live in self._sizes.items():
            n = 0
            for h in block_hashes(token_ids, bs):
                still = live & holders.get(h, 0)
                if still != live:
                    if n:
                        self._settle(live & ~still, n * bs, self._names, out)
                    live = still
                    if not live:
                        break
                n += 1
            if live and n:
                self._settle(live, n * bs, self._names, out)
        return out

    @staticmethod
    def _settle(bits: int, tokens: int, names: dict[int, str], out: dict[str, int]) -> None:
        while bits:
            low = bits & -bits
            out[names[low.bit_length() - 1]] = tokens
            bits ^= low
