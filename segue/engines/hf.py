"""Hugging Face transformers models as a batched engine (CPU, or GPU when present).

A scheduler thread runs the model; the asyncio side only queues requests, reads token
streams and aborts. Each step admits waiting requests (at most `max_num_seqs` running, KV
blocks reserved for prompt + max_tokens as in the mocker, real blocks of the paged pool in
`segue.engines.paged`), then runs two batched forward passes: one over prompt chunks (new
sequences, at most `max_batched_tokens` tokens, a longer prompt continues next step) and one
decode pass over every other running sequence, a CUDA graph on a GPU. Sequences join and
leave between steps. An abort takes effect before the next step and frees its blocks.

Disaggregation and live moves copy KV between paged pools: a prefill computes the KV of all
tokens but the last, `kv_codec` turns those positions' blocks into a payload, the decode side
writes them into blocks of its own and feeds the last token. Token choice is `sampler`'s,
after a constrained row's grammar masked its logits (`constrained`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segue.engines import kv_codec, sampler
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
from segue.engines.constrained import EngineGrammars, mask_logits
from segue.engines.hf_sequence import Sequence
from segue.engines.loop_bridge import LoopEvents, deliver
from segue.engines.seqtable import SeqTable
from segue.protocol import FinishReason, Logprob
from segue.stopping import finish_reason

log = logging.getLogger("segue.hf")


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


@dataclass
class _Step:
    """A launched step: its rows, and what completing it needs."""

    decodes: list[Sequence]
    chunks: list[tuple[Sequence, int]]  # prompt chunks, those of 0 tokens included
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # chunks computed
    decode_logits: Any = None
    prefill_logits: Any = None
    prompt_rows: dict[int, Any] = field(default_factory=dict)  # every position's logits
    ids: int = 0  # the `PagedModel.fetch_ids` copy holding its argmax
    plain: bool = True  # every row's token is its argmax: it may complete later


class HFEngine(Engine):
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
        self._inflight: _Step | None = None  # launched, not completed (scheduler thread)
        self.overlap = cfg.overlap == "on"
        self._loop: Any = None  # the worker's event loop, from start()
        self._failed: str | None = None
        self._prompt_tokens = dict.fromkeys(
            ("computed", "local_cache_hit", "external_kv_transfer"), 0
        )  # by where their KV came from, as vLLM counts them

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
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

    def _take_exports(self) -> None:
        """Under the lock: hold each exported sequence's blocks and finish its stream
        EXPORTED."""
        for rid in self._exports:
            seq = self.table.seqs.get(rid)
            if seq is None or seq.done or seq.pending != 1:
                continue
            seq.done = True
            context = list(seq.ctx)
            key = self.table.hold(seq, context)
            seq.stream.kv_key, seq.stream.kv_tokens = key, context
            self._call(seq.stream.finish, EngineFinish.EXPORTED)
        self._exports.clear()

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

    def _step(self) -> bool:
        """Plans and launches one step, then completes the step before it (still on the
        GPU until now) and, unless every row of this one is plain, this one too."""
        if self._inflight is not None and self._exports:
            self._complete(self._inflight)  # an export needs the context's KV exactly
            self._inflight = None
        with self._lock:
            if self._exports:
                self._take_exports()
            for seq in self.table.admit():
                seq.table = seq.kv.ids  # one list: a block swapped for a shared one shows
                seq.computed = seq.kv.cached_tokens
                seq.stream.cached_tokens = seq.kv.cached_tokens
                self._prompt_tokens["local_cache_hit"] += seq.kv.cached_tokens
                if seq.imported is not None:  # a DECODE: its context's KV is pulled
                    if seq.imported:
                        self.paged.write(seq.table, seq.imported)
                    n = len(seq.ctx) - 1
                    self._prompt_tokens["external_kv_transfer"] += n
                    seq.computed, seq.imported = n, None
                seq.fed = seq.computed
            running: list[Sequence] = list(self.table.running.values())
        step = self._launch(running)
        if step is None:
            if self._inflight is None:
                return False
            self._complete(self._inflight)
            self._inflight = None
            return True
        if self._inflight is not None:
            self._complete(self._inflight)
        self._inflight = None
        if self.overlap and step.plain:
            self._inflight = step  # completed after the next launch, while the GPU runs it
        else:
            self._complete(step)
        return True

    def _launch(self, running: list[Sequence]) -> _Step | None:
        """The next step's rows: a decode row for each sequence whose next token is known
        (on the CPU, or still on the GPU from the step in flight: `src`), prompt chunks
        for the others within `max_batched_tokens`; runs them (on a GPU: queues them)."""
        chunks: list[tuple[Sequence, int]] = []  # (sequence, prompt tokens this step)
        decodes: list[Sequence] = []
        src: list[int] = []
        budget = self.cfg.max_batched_tokens
        inflight = self._inflight is not None
        for seq in running:
            if seq.done:
                continue
            known = len(seq.ctx) - seq.fed  # tokens the CPU has that no step was given
            if known == 1 and seq.gen:
                decodes.append(seq)
                src.append(-1)
            elif known > 0:
                if budget > 0:
                    n = min(known, budget)
                    budget -= n
                    chunks.append((seq, n))
            elif seq.fed == seq.computed:
                if not seq.gen:  # a PREFILL whose context was all cached: done
                    chunks.append((seq, 0))
            elif (
                inflight
                and seq.gen
                and seq.plain
                and known == 0
                and len(seq.out) + 2 <= seq.req.max_tokens
            ):  # its next token is still on the GPU: the step reads it there
                decodes.append(seq)
                src.append(seq.row)
        if not chunks and not decodes:
            return None
        step = _Step(decodes, chunks)
        if decodes:
            batch = [
                (s.ctx[-1] if i < 0 else 0, s.fed, s.table)
                for s, i in zip(decodes, src, strict=True)
            ]
            step.decode_logits = self.paged.decode(batch, src)
            for row, seq in enumerate(decodes):
                seq.fed += 1
                seq.row = row
                step.plain = step.plain and seq.plain
        work = [(s, n) for s, n in chunks if n > 0]
        if work:
            chunk = [(s.ctx[s.fed : s.fed + n], s.fed, s.table) for s, n in work]
            self._prompt_tokens["computed"] += sum(n for _, n in work)
            every = frozenset(i for i, (s, _) in enumerate(work) if s.prompt_lps is not None)
            step.prefill_logits, step.prompt_rows = self.paged.prefill(chunk, every)
            base = self.paged.prefill_base
            for row, (seq, n) in enumerate(work):
                seq.fed += n
                seq.row = base + row
                step.plain = step.plain and seq.plain
        step.work = work
        step.ids = self.paged.fetch_ids()
        return step

    def _complete(self, step: _Step) -> None:
        """What a launched step computed: counts each row's tokens, hands on the tokens
        it sampled, holds the KV of prefills that are done."""
        ids = self.paged.ids(step.ids)
        for i, all_logits in step.prompt_rows.items():
            seq, n = step.work[i]
            self._prompt_logprobs(seq, n, all_logits)
        if step.decodes:
            work = [(s, 1) for s in step.decodes]
            self._advance(work, ids, 0, step.decode_logits)
        if step.work:
            self._advance(step.work, ids, self.paged.prefill_base, step.prefill_logits)
        with self._lock:  # prefills whose context is done: hold their KV for the decode side
            for seq, _ in step.chunks:
                if not seq.gen and not seq.done and seq.computed == len(seq.ctx):
                    seq.done = True
                    key = self.table.hold(seq, list(seq.req.token_ids))
                    seq.stream.kv_key = key
                    self._call(seq.stream.finish, EngineFinish.PREFILLED)

    def _advance(
        self, work: list[tuple[Sequence, int]], ids: list[int], base: int, logits: Any
    ) -> None:
        """Counts each sequence's computed tokens; one that reached the end of its context
        takes its next token: a plain one the step's argmax (`ids[base + row]`), another
        one chosen from its row of `logits` (valid: such a step completes at once)."""
        chosen = [
            row
            for row, (seq, n) in enumerate(work)
            if not seq.plain and seq.gen and not seq.done and seq.computed + n == len(seq.ctx)
        ]
        greedy: list[int] = []
        if chosen:
            matchers = [(row, work[row][0].matcher) for row in chosen]
            mask_logits(logits, [(row, m) for row, m in matchers if m is not None])
            greedy = self.torch.argmax(logits, dim=-1).tolist()
        pushed: list[tuple[RequestStream, int, Logprob | None]] = []
        finished: list[tuple[Sequence, EngineFinish]] = []
        caching, bs = self.table.prefix_caching, self.cfg.block_size
        eos = self.eos
        with self._lock:
            for row, (seq, n) in enumerate(work):
                if seq.done:  # aborted, or finished by a token of the step before
                    continue
                seq.computed += n
                if caching and seq.computed // bs != (seq.computed - n) // bs:
                    self.table.computed(seq, seq.ctx[: seq.computed])  # new full blocks
                if not seq.gen or seq.computed < len(seq.ctx):
                    continue
                req = seq.req
                sp = req.sampling
                lp = None
                if seq.plain:
                    tok = ids[base + row]
                else:
                    generated = req.token_ids[len(req.token_ids) - req.generated :] + seq.out
                    position = len(req.token_ids) + len(seq.out)
                    tok = sampler.choose(
                        self.torch, logits[row], greedy[row], sp, seq.ctx, generated, eos, position
                    )
                    if sp.logprobs is not None:
                        lp = self._logprob(logits[row], tok, sp.logprobs)
                seq.ctx.append(tok)
                seq.out.append(tok)
                pushed.append((seq.stream, tok, lp))
                done = finish_reason(
                    tok, len(seq.out), req.max_tokens, sp.stop_token_ids, eos, sp.ignore_eos
                )
                if seq.matcher is not None:
                    if not seq.matcher.accept(tok):  # masked: only a bug gets here
                        finished.append((seq, EngineFinish.ERROR))
                        continue
                    if seq.matcher.done:
                        done = done or FinishReason.STOP  # the grammar is whole
                if done is not None:
                    finished.append((seq, EngineFinish(done)))
            # One wake-up of the event loop per step for all tokens (a thread-safe call
            # writes to the loop's self-pipe: one per token cost a syscall each), queued
            # before the finishes.
            if pushed:
                self._call(deliver, pushed)
            for seq, reason in finished:
                self._finish_locked(seq, reason)

    def _prompt_logprobs(self, seq: Sequence, n: int, logits: Any) -> None:
        """The logprobs of the prompt tokens this chunk's logits predict (position p's
        logits predict token p + 1); once the prompt is done they go to the stream, before
        its first token."""
        lps = seq.prompt_lps
        assert lps is not None
        k = seq.req.prompt_logprobs or 0
        prompt = seq.req.token_ids
        for j in range(n):
            p = seq.computed + j + 1
            if p < len(prompt):
                lps.append(self._logprob(logits[j], prompt[p], k))
        if len(lps) == len(prompt):
            self._call(seq.stream.set_prompt_logprobs, lps)
            seq.prompt_lps = None

    def _logprob(self, logits: Any, tok: int, k: int) -> Logprob:
        return sampler.logprob(self.torch, logits, tok, k)
