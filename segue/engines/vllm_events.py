"""vLLM's own KV events (its ZMQ publisher, `KVEventsConfig`) relayed as segue KV events.

vLLM names a block by its own hash (seeded per process, so no other process can compute
it); a `BlockStored` event carries the blocks' token ids and the parent's vLLM hash. The
relay names each block by segue's chained hash of those token ids (segue.blocks), so the
frontend's index can match a prompt it has only tokenized, and keeps the vLLM -> segue map
to translate removals. Only blocks on the device tier count (offloaded copies do not save a
prefill on this worker's compute).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from segue.blocks import ROOT, block_hashes
from segue.engines.base import KvEvents

log = logging.getLogger("segue.vllm")
_DEVICE_TIERS = (None, "GPU")


def events_endpoint() -> str:
    """A fresh IPC endpoint for one engine's publisher (bound by vLLM)."""
    return f"ipc://{os.environ.get('TMPDIR', '/tmp')}/segue-vllm-events-{uuid.uuid4().hex}"


class VllmKvEventRelay:
    def __init__(self, sink: KvEvents, endpoint: str) -> None:
        self.sink = sink
        self.endpoint = endpoint
        self.names: dict[object, int] = {}  # vLLM block hash -> segue block hash
        self._last_seq = -1

    async def run(self) -> None:
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import (
            AllBlocksCleared,
            BlockRemoved,
            BlockStored,
            KVEventBatch,
        )

        decode = msgspec.msgpack.Decoder(KVEventBatch).decode
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        try:
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if self._last_seq >= 0 and seq != self._last_seq + 1:
                    log.warning("vLLM KV events: gap (%d after %d)", seq, self._last_seq)
                self._last_seq = seq
                for ev in decode(payload).events:
                    if type(ev) is BlockStored and ev.medium in _DEVICE_TIERS:
                        self._stored(
                            ev.block_hashes, ev.parent_block_hash, ev.token_ids, ev.block_size
                        )
                    elif type(ev) is BlockRemoved and ev.medium in _DEVICE_TIERS:
                        gone = [self.names.pop(h) for h in ev.block_hashes if h in self.names]
                        if gone:
                            self.sink.removed(gone)
                    elif type(ev) is AllBlocksCleared and self.names:
                        gone, self.names = list(self.names.values()), {}
                        self.sink.removed(gone)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("vLLM KV event relay stopped")
        finally:
            sub.close(linger=0)
            ctx.term()

    def _stored(
        self, vllm_hashes: list, parent: object, token_ids: list[int], block_size: int
    ) -> None:
        if parent is None:
            start = ROOT
        elif parent in self.names:
            start = self.names[parent]
        else:
            return  # its parent's event was missed: unnameable
        ours = block_hashes(token_ids, block_size, start)
        if len(ours) != len(vllm_hashes):
            return  # not whole blocks: not what vLLM documents
        self.names.update(zip(vllm_hashes, ours, strict=True))
        self.sink.stored(ours)
