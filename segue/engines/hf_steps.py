"""The hf engine's scheduler thread, one step at a time: admit what fits, launch the
step's rows (decodes, prompt chunks) on the model, and complete a launched step: count
each sequence's computed tokens, take its next token, hand the tokens to the event loop,
finish what is done.

With `overlap` (a GPU's default) a step of plain rows (greedy or sampled, no logprobs,
penalties or grammar) completes only after the next step is launched: each step's tokens are
chosen on the device (the argmax in the captured graph, a seeded draw for rows with a
temperature: `sampler.sample_rows`), reach the host by an asynchronous copy, and a sequence
whose token the CPU has not seen yet is fed it there (`PagedModel.decode`'s `src`), so the
GPU never waits for Python. A sequence that stopped at a token of the step in flight had one
more step computed, which is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from segue.engines import sampler
from segue.engines.base import EngineFinish, RequestStream
from segue.engines.constrained import mask_logits
from segue.engines.hf_sequence import Sequence
from segue.engines.loop_bridge import deliver
from segue.engines.seqtable import SeqTable
from segue.protocol import FinishReason, Logprob
from segue.stopping import finish_reason


@dataclass
class Step:
    """A launched step: its rows, and what completing it needs."""

    decodes: list[Sequence]
    chunks: list[tuple[Sequence, int]]  # prompt chunks, those of 0 tokens included
    work: list[tuple[Sequence, int]] = field(default_factory=list)  # chunks computed
    decode_logits: Any = None
    prefill_logits: Any = None
    prompt_rows: dict[int, Any] = field(default_factory=dict)  # every position's logits
    ids: int = 0  # the `PagedModel.fetch_ids` copy holding its tokens
    plain: bool = True  # every row's token was chosen on the device: it may complete later


class HFSteps:
    """The steps of `segue.engines.hf.HFEngine`, run by its scheduler thread; the state
    they share with the event-loop side is the engine's (below), touched under its lock."""

    cfg: Any  # HFConfig
    paged: Any  # PagedModel
    torch: Any
    eos: Any
    table: SeqTable
    overlap: bool
    _lock: threading.Lock
    _exports: set[str]
    _inflight: Step | None
    _prompt_tokens: dict[str, int]

    def _finish_locked(
        self, seq: Sequence, reason: EngineFinish, error: str | None = None
    ) -> None: ...

    def _call(self, fn, *args) -> None: ...

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

    def _launch(self, running: list[Sequence]) -> Step | None:
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
        step = Step(decodes, chunks)
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
            self._draw(list(enumerate(decodes)), step.decode_logits, 0)
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
            ends = [(row, s) for row, (s, _) in enumerate(work) if s.gen and s.fed == len(s.ctx)]
            self._draw(ends, step.prefill_logits, base)
        step.work = work
        step.ids = self.paged.fetch_ids()
        return step

    def _draw(self, rows: list[tuple[int, Sequence]], logits: Any, base: int) -> None:
        """The tokens of the plain rows that sample (a temperature), drawn on the device
        into `last_ids` in place of the step's argmax; `rows`: (row, sequence) whose next
        token this step makes, at position `sequence.fed`."""
        rows = [(r, s) for r, s in rows if s.draws]
        if not rows:
            return
        torch, up = self.torch, self.paged.upload
        sps = [s.req.sampling for _, s in rows]
        idx = up([r for r, _ in rows])
        keys = sampler.row_keys(
            up(sampler.key_parts([sp.seed for sp in sps], [s.fed for _, s in rows]))
        )
        temps = up([sp.temperature for sp in sps], torch.float32)
        top_ps = up([sp.top_p for sp in sps], torch.float32)
        cut = any(sp.top_p < 1.0 for sp in sps)
        toks = sampler.sample_rows(torch, logits.index_select(0, idx), temps, top_ps, keys, cut)
        self.paged.last_ids.index_copy_(0, idx + base, toks)

    def _complete(self, step: Step) -> None:
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
        takes its next token: a plain one what the step chose on the device (`ids[base +
        row]`: its argmax, or its draw), another one chosen from its row of `logits` (valid:
        such a step completes at once)."""
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
