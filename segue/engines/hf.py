"""Hugging Face transformers models as a batched engine (CPU, or GPU when present).

A scheduler thread runs the model; the asyncio side only queues requests, reads token
streams and aborts. Each step admits waiting requests (at most `max_num_seqs` running, KV
blocks reserved for prompt + max_tokens as in the mocker, real blocks of the paged pool in
`segue.engines.paged`), then runs two batched forward passes: a decode pass over every
running sequence whose next token is known (a CUDA graph on a GPU) and one over prompt
chunks (new sequences, at most `max_batched_tokens` tokens, a longer prompt continues next
step); `hf_steps` runs them, overlapping a step's CPU work with the GPU's. Sequences join
and leave between steps. An abort takes effect before the next step and frees its blocks.

Disaggregation and live moves copy KV between paged pools: a prefill computes the KV of all
tokens but the last, `kv_codec` turns those positions' blocks into a payload, the decode side
writes them into blocks of its own and feeds the last token. Token choice is `sampler`'s,
after a constrained row's grammar masked its logits (`constrained`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segue.engines import kv_codec
from segue.engines.base import (
    Engine,
    EngineFinish,
    EngineInput,
    EngineRequestError,
    EngineStats,
    EngineTask,
    KvEvents,
    RequestStream,
)
from segue.engines.constrained import EngineGrammars
from segue.engines.hf_sequence import Sequence
from segue.engines.hf_steps import HFSteps, Step
from segue.engines.loop_bridge import LoopEvents
from segue.engines.seqtable import SeqTable

log = logging.getLogger("segue.hf")

SWITCH_INTERVAL_S = 0.0005  # the GIL's, in a worker whose steps overlap (start)


@dataclass
class HFConfig:
    model_dir: str
    max_num_seqs: int = 8
    kv_blocks: int = 4096
    block_size: int = 16
    device: str = "auto"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_batched_tokens: int = 2048  # prompt tokens one step computes
    cuda_graphs: bool = True
    prefix_caching: bool = True
    kernels: str = "auto"  # auto, torch or triton (PagedModel)
    # launch a step before handling the one before it (steps of plain sequences): auto,
    # on a GPU, where the GPU then never waits for the CPU; on, off
    overlap: str = "auto"


class HFEngine(HFSteps, Engine):
    def __init__(self, cfg: HFConfig, tokenizer) -> None:
        self.cfg = cfg
        self.eos = tokenizer.eos_token_ids
        self.tokenizer = tokenizer
        self.grammars = EngineGrammars(tokenizer)  # remade for the model's vocabulary in start
        # torch and the model load in start() (a heavy import, a slow load): Any until then
        self.paged: Any = None
        self.torch: Any = None
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stop = False
        # Shared with the scheduler thread: touched only under self._lock.
        # the pool's blocks; with prefix caching, full blocks stay cached after their
        # sequence (named as the mocker names them) for later prompts with that prefix
        self.table = SeqTable(cfg.kv_blocks, cfg.block_size, cfg.max_num_seqs, cfg.prefix_caching)
        self._exports: set[str] = set()  # requests to export at the next step
        self.max_blocks = min(cfg.kv_blocks, -(-cfg.max_model_len // cfg.block_size) + 1)
        self._thread: threading.Thread | None = None
        self._inflight: Step | None = None  # launched, not completed (scheduler thread)
        self.overlap = cfg.overlap == "on"
        self._loop: Any = None  # the worker's event loop, from start()
        self._failed: str | None = None
        self._prompt_tokens = dict.fromkeys(
            ("computed", "local_cache_hit", "external_kv_transfer"), 0
        )  # by where their KV came from, as vLLM counts them

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        if self.overlap:
            # The scheduler thread now rarely waits (the GPU runs behind it), so it holds
            # the GIL but for moments, and the event loop (uvloop takes the GIL once per
            # I/O callback) waited up to the 5 ms switch interval each time it wanted it:
            # new requests crossed the loop in bursts. Hand it over within 0.5 ms.
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from segue.engines.paged import PagedModel

        self.torch = torch
        device = self.cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model: Any = AutoModelForCausalLM.from_pretrained(
            Path(self.cfg.model_dir), dtype=getattr(torch, self.cfg.dtype)
        )
        # the logits may be wider than the tokenizer's vocabulary (padded embeddings)
        self.grammars = EngineGrammars(self.tokenizer, model.config.vocab_size)
        self.overlap = self.cfg.overlap == "on" or (
            self.cfg.overlap == "auto" and device.startswith("cuda")
        )
        self.paged = PagedModel(
            model.to(device).eval(),
            self.cfg.kv_blocks,
            self.cfg.block_size,
            self.max_blocks,
            self.cfg.max_num_seqs,
            self.cfg.cuda_graphs,
            self.cfg.kernels,
        )
        log.info(
            "loaded %s on %s (%s, %d KV blocks, CUDA graphs %s)",
            self.cfg.model_dir,
            device,
            self.cfg.dtype,
            self.cfg.kv_blocks,
            "on" if self.paged.graphs_on else "off",
        )

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
            stats = self.table.stats()
            stats.prompt_tokens = dict(self._prompt_tokens)
        return stats

    def publish_kv_events(self, events: KvEvents) -> bool:
        """The cache's blocks as they are, then what becomes cached or is evicted. The
        table changes on the engine thread; `events` lives on the event loop."""
        if not self.cfg.prefix_caching:
            return False
        loop = asyncio.get_running_loop()
        with self._lock:
            events.start(self.cfg.block_size, self.cfg.kv_blocks, self.table.cached_hashes())
            self.table.events = LoopEvents(loop, events)
        return True

    # -- event-loop side: requests -------------------------------------------------------
    async def prepare(self, inp: EngineInput) -> None:
        await self.grammars.prepare(inp)

    def add_request(self, req: EngineInput) -> RequestStream:
        with self._lock:
            blocks = self.table.blocks_for(req)
        if blocks > self.max_blocks:
            raise EngineRequestError(
                f"request needs {blocks} KV blocks, a sequence may have {self.max_blocks}"
            )
        matcher = self.grammars.matcher(req)
        stream = RequestStream(req.request_id)
        seq = Sequence(req, stream, blocks)
        seq.matcher = matcher
        if req.task is EngineTask.DECODE:
            seq.imported = kv_codec.decode(
                self.torch, self.paged, self.cfg.dtype, req.token_ids, req.kv_payload
            )
        # cached blocks serve a prompt unless its KV comes with it or each prompt
        # position's logits are wanted (prompt logprobs)
        reuse = seq.imported is None and req.prompt_logprobs is None
        with self._lock:
            self.table.add(seq, reuse)
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
        """Done by the scheduler thread between steps (`_take_exports`), where a decoding
        sequence's blocks hold exactly the KV of its context but the last token."""
        with self._lock:
            seq = self.table.seqs.get(request_id)
            if seq is None or seq.done or not seq.gen or seq.pending != 1:
                return False
            self._exports.add(request_id)
        self._work.set()
        return True

    def kv_payload(self, key: str) -> bytes:
        seq, ids = self.table.held[key]
        return kv_codec.encode(self.torch, self.paged, self.cfg.dtype, seq.table, ids)

    def kv_nbytes(self, key: str) -> int:
        ids = self.table.held[key][1]
        return (len(ids) - 1) * self.paged.bytes_per_token

    def release_kv(self, key: str) -> bool:
        with self._lock:
            entry = self.table.held.get(key)
            if entry is None or not self.table.release(key):
                return False
            entry[0].table = []
        self._work.set()
        return True

    # -- scheduler thread ----------------------------------------------------------------

    def _finish_locked(self, seq: Sequence, reason: EngineFinish, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.table.remove(seq)
        seq.table = []
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
