"""Hugging Face transformers as an engine (CPU, or GPU when present).

A scheduler thread runs the model; the asyncio side only queues requests, reads token
streams and aborts. Each step admits waiting requests (at most `max_num_seqs` running, KV
blocks reserved for prompt + max_tokens as in the mocker), prefills the new ones, then runs
one decode step for every running sequence, one forward pass each over its own KV cache
(a step-level batcher: sequences advance together step by step; their forward passes are
not fused into one padded batch). An abort takes effect before the next step; dropping the
sequence's cache frees its memory.

Disaggregation moves the real KV tensors: a prefill computes the cache of all tokens but
the last; the payload is a msgpack header (shapes, dtype, token digest) followed by the raw
tensor bytes; the decode side rebuilds the cache and feeds the last token. No pickle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from segue.engines.base import (
    Engine,
    EngineFinish,
    EngineInput,
    EngineRequestError,
    EngineStats,
    EngineTask,
    RequestStream,
)
from segue.engines.seqtable import SeqTable
from segue.protocol import token_digest
from segue.stopping import finish_reason

log = logging.getLogger("segue.hf")


class _KvHeader(msgspec.Struct):
    digest: str
    num_tokens: int  # tokens the cache covers
    dtype: str
    shapes: list[list[int]]  # per layer: keys shape (values have the same)


@dataclass
class HFConfig:
    model_dir: str
    max_num_seqs: int = 8
    kv_blocks: int = 4096
    block_size: int = 16
    device: str = "auto"
    dtype: str = "float32"


class _Seq:
    __slots__ = ("req", "stream", "blocks", "cache", "next_input", "out", "done", "imported", "kv")

    def __init__(self, req: EngineInput, stream: RequestStream, blocks: int) -> None:
        self.req, self.stream, self.blocks = req, stream, blocks
        self.cache = None
        self.next_input: list[int] = []
        self.out: list[int] = []  # tokens generated
        self.done = False
        self.imported = None  # (cache) for a decode from a pulled payload


class HFEngine(Engine):
    def __init__(self, cfg: HFConfig, tokenizer) -> None:
        self.cfg = cfg
        self.eos = tokenizer.eos_token_ids
        # torch and the model load in start() (a heavy import, a slow load): Any until then
        self.model: Any = None
        self.torch: Any = None
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stop = False
        # Shared with the scheduler thread: touched only under self._lock.
        self.table = SeqTable(cfg.kv_blocks, cfg.block_size, cfg.max_num_seqs)
        self._exports: set[str] = set()  # requests to export at the next step
        self._thread: threading.Thread | None = None
        self._loop: Any = None  # the worker's event loop, from start()
        self._failed: str | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        model: Any = AutoModelForCausalLM.from_pretrained(
            Path(self.cfg.model_dir), dtype=getattr(torch, self.cfg.dtype)
        )
        self.model = model.to(device).eval()
        log.info("loaded %s on %s (%s)", self.cfg.model_dir, device, self.cfg.dtype)

    async def stop(self) -> None:
        self._stop = True
        self._work.set()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 5)

    @property
    def healthy(self) -> bool:
        return self._failed is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._lock:
            return self.table.stats()

    # -- requests (event-loop side) ------------------------------------------------------

    def add_request(self, req: EngineInput) -> RequestStream:
        with self._lock:
            blocks = self.table.blocks_for(req)
        stream = RequestStream(req.request_id)
        seq = _Seq(req, stream, blocks)
        if req.task is EngineTask.DECODE:
            seq.imported = self._import_kv(req.token_ids, req.kv_payload)
        with self._lock:
            self.table.add(seq)
        self._work.set()
        return stream

    def abort(self, request_id: str) -> bool:
        with self._lock:
            seq = self.table.seqs.get(request_id)
            if seq is None:
                return False
            self._finish_locked(seq, EngineFinish.ABORT)
        return True

    def export(self, request_id: str) -> bool:
        """Done by the scheduler thread between steps (`_take_exports`): the cache is
        mutated inside a forward pass, so only there is it known to cover exactly the
        context but its last token."""
        with self._lock:
            seq = self.table.seqs.get(request_id)
            if seq is None or seq.done or seq.cache is None:
                return False
            self._exports.add(request_id)
        self._work.set()
        return True

    def _take_exports(self) -> None:
        """Under the lock: hold each exported sequence's cache (which covers its context
        but the last token, like a prefill's) and finish its stream EXPORTED."""
        for rid in self._exports:
            seq = self.table.seqs.get(rid)
            if seq is None or seq.done or seq.cache is None:
                continue
            context = seq.req.token_ids + seq.out
            seq.done = True
            key = self.table.hold(seq, (seq.cache, context))
            seq.stream.kv_key, seq.stream.kv_tokens = key, context
            self._call(seq.stream.finish, EngineFinish.EXPORTED)
        self._exports.clear()

    def kv_payload(self, key: str) -> bytes:
        cache, ids = self.table.held[key][1]
        layers = cache.layers if cache is not None else []
        header = _KvHeader(
            token_digest(ids),
            len(ids) - 1,
            self.cfg.dtype,
            [list(layer.keys.shape) for layer in layers],
        )
        head = msgspec.msgpack.encode(header)
        parts = [len(head).to_bytes(4, "big"), head]
        for layer in layers:
            for t in (layer.keys, layer.values):
                parts.append(t.detach().to("cpu").contiguous().numpy().tobytes())
        return b"".join(parts)

    def kv_nbytes(self, key: str) -> int:
        cache = self.table.held[key][1][0]
        if cache is None:
            return 0
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
        )

    def release_kv(self, key: str) -> bool:
        with self._lock:
            if not self.table.release(key):
                return False
        self._work.set()
        return True

    def _import_kv(self, token_ids: list[int], payload: bytes | None):
        """Rebuilds a cache from a pulled payload, checking it is for these tokens."""
        import numpy as np
        from transformers import DynamicCache

        torch = self.torch
        if payload is None:
            raise EngineRequestError("a decode needs a KV payload")
        try:
            n = int.from_bytes(payload[:4], "big")
            header = msgspec.msgpack.decode(payload[4 : 4 + n], type=_KvHeader)
        except (TypeError, ValueError, msgspec.DecodeError):
            raise EngineRequestError("KV payload is not a segue KV payload") from None
        if header.digest != token_digest(token_ids) or header.num_tokens != len(token_ids) - 1:
            raise EngineRequestError("KV payload does not belong to this request's tokens")
        if header.dtype != self.cfg.dtype:
            raise EngineRequestError(f"KV payload is {header.dtype}, engine is {self.cfg.dtype}")
        if not header.shapes:
            return None
        cache = DynamicCache()
        dtype = getattr(torch, header.dtype)
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        pos = 4 + n
        for i, shape in enumerate(header.shapes):
            size = int(np.prod(shape)) * np_dtype.itemsize
            k, v = (
                torch.from_numpy(
                    np.frombuffer(payload, np_dtype, int(np.prod(shape)), pos + j * size)
                    .reshape(shape)
                    .copy()
                ).to(self.device)
                for j in (0, 1)
            )
            pos += 2 * size
            cache.update(k, v, i)
        if pos != len(payload):
            raise EngineRequestError("KV payload has the wrong size")
        return cache

    # -- scheduler thread ----------------------------------------------------------------

    def _finish_locked(self, seq: _Seq, reason: EngineFinish, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.table.remove(seq)
        seq.cache = None
        seq.imported = None
        self._call(seq.stream.finish, reason, error)
        self._work.set()

    def _call(self, fn, *args) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            with self.torch.inference_mode():
                while not self._stop:
                    if not self._step():
                        self._work.wait(0.5)
                        self._work.clear()
        except Exception as e:  # the engine is dead: report unhealthy, fail requests
            log.exception("engine thread failed")
            self._failed = repr(e)
            with self._lock:
                for seq in list(self.table.seqs.values()):
                    self._finish_locked(seq, EngineFinish.ERROR, f"engine failed: {e!r}")

    def _step(self) -> bool:
        with self._lock:
            if self._exports:
                self._take_exports()
            admitted = self.table.admit()
            decoding = [
                s for s in self.table.running.values() if s.cache is not None and s not in admitted
            ]
        if not admitted and not decoding:
            return False
        for seq in admitted:
            self._prefill(seq)
        for seq in decoding:
            if not seq.done:
                self._forward(seq, seq.next_input)
        return True

    def _prefill(self, seq: _Seq) -> None:
        ids = seq.req.token_ids
        if seq.req.task is EngineTask.PREFILL:  # cache of all tokens but the last, then hand over
            cache = None
            if len(ids) > 1:
                out = self.model(self._tensor(ids[:-1]), use_cache=True)
                cache = out.past_key_values
            with self._lock:
                if seq.done:
                    return
                seq.done = True
                key = self.table.hold(seq, (cache, ids))
            seq.stream.kv_key = key
            self._call(seq.stream.finish, EngineFinish.PREFILLED)
            return
        if seq.imported is not None or (seq.req.task is EngineTask.DECODE and len(ids) == 1):
            seq.cache, seq.imported = seq.imported, None
            self._forward(seq, ids[-1:])  # the last token was left for the decode side
            return
        self._forward(seq, ids)

    def _tensor(self, ids: list[int]):
        return self.torch.tensor([ids], dtype=self.torch.long, device=self.device)

    def _forward(self, seq: _Seq, ids: list[int]) -> None:
        torch = self.torch
        out = self.model(self._tensor(ids), past_key_values=seq.cache, use_cache=True)
        logits = out.logits[0, -1].float()
        req = seq.req
        if req.temperature == 0:
            tok = int(torch.argmax(logits))
        else:
            # Seeded per (request seed, position) so a migrated request samples the same.
            pos = len(req.token_ids) + len(seq.out)
            g = torch.Generator(device="cpu").manual_seed((req.seed * 1_000_003 + pos) % 2**63)
            probs = torch.softmax(logits.cpu() / req.temperature, dim=-1)
            if req.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                keep = torch.cumsum(sp, 0) - sp < req.top_p
                probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
            tok = int(torch.multinomial(probs, 1, generator=g))
        with self._lock:
            if seq.done:  # aborted during the forward pass
                return
            seq.cache = out.past_key_values
            seq.next_input = [tok]
            seq.out.append(tok)
            self._call(seq.stream.push, tok)
            done = finish_reason(
                tok, len(seq.out), req.max_tokens, req.stop_token_ids, self.eos, req.ignore_eos
            )
            if done is not None:
                self._finish_locked(seq, EngineFinish(done))
