"""A simulated engine with the scheduling and memory behaviour of a real one.

Continuous batching (at most `max_num_seqs` running), a FIFO waiting queue, a KV block pool
reserved on admission for prompt + max_tokens and freed on finish or abort, and a timing
model: a prefill takes prompt_tokens / prefill_tps, a decode step takes step_ms growing with
the batch size, all divided by `speedup`.

Output is a pure function of (seed, context): each token is picked from the tokenizer's
readable vocabulary by a hash folded over prompt + tokens generated so far. A request that
is re-sent with prompt + generated tokens therefore continues exactly where it stopped.
The mocker never emits EOS: a request runs to max_tokens unless a stop token is asked for.

Prefix caching (on by default, as in vLLM): full blocks keep their KV after their request
ends and a later prompt with the same prefix reuses them; only the uncached part of a prompt
costs prefill time (segue.engines.seqtable). A request's output does not depend on it.

Disaggregation and live moves: a prefill (or an export) produces a simulated KV payload of
`kv_bytes_per_token` bytes per context token, derived from the token ids, so a decode worker
can check that a payload belongs to its context; a decode from a payload skips the prefill.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

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
from segue.engines.seqtable import SeqBlocks, SeqTable
from segue.grammar import Matcher
from segue.options import option
from segue.protocol import FinishReason, Logprob
from segue.sampling import Constraint
from segue.stopping import finish_reason

log = logging.getLogger("segue.mocker")

_MASK = (1 << 64) - 1
_FNV_PRIME = 0x100000001B3
_FNV_OFFSET = 0xCBF29CE484222325


def fold(h: int, token_ids: Iterable[int]) -> int:
    """FNV-1a over token ids: the context fingerprint the next token is drawn from."""
    for t in token_ids:
        h = ((h ^ t) * _FNV_PRIME) & _MASK
    return h


def draw(h: int, seed: int, n: int) -> int:
    """splitmix64 finaliser of (context hash, seed), reduced to [0, n)."""
    x = (h ^ (seed * 0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) % n


def simulated_kv(token_ids: list[int], bytes_per_token: int) -> bytes:
    """The mocker's stand-in for a KV cache: a digest of the whole token sequence (so no
    other sequence has it), repeated to the size a real KV would have. Making and checking
    it costs a copy of its bytes, as moving a real KV does, not Python work per token."""
    digest = hashlib.blake2b(array("I", token_ids).tobytes(), digest_size=16).digest()
    return digest * (len(token_ids) * max(1, bytes_per_token // 16))


@dataclass(frozen=True)
class MockerConfig:
    max_num_seqs: int = option(256, help="most sequences running at once")
    kv_blocks: int = option(16384, help="KV cache blocks in the simulated pool")
    block_size: int = option(16, help="tokens per KV block")
    prefix_caching: bool = option(
        True, help="keep full blocks cached after their request and reuse them (true/false)"
    )
    step_ms: float = option(5.0, help="decode step time for one sequence, before speedup")
    prefill_tps: float = option(
        50000.0, help="prefill speed in prompt tokens per second, before speedup"
    )
    batch_slowdown: float = option(0.01, help="extra step time per running sequence")
    speedup: float = option(1.0, help="divide every simulated time by this (large: instant)")
    seed: int = option(0, help="seed of the simulated model")
    kv_bytes_per_token: int = option(
        1024, help="size of the simulated KV payload a prefill hands over"
    )
    tool_calls: bool = option(
        False, help="answer a request that has tools with a well-formed call of one (true/false)"
    )
    # Fault injection for tests: after emitting this many tokens in all, the engine stops
    # stepping forever (a hung engine inside a live worker).
    hang_after_tokens: int | None = option(
        None, flag="--fault-engine-hang-after-tokens", hidden=True, help="fault injection"
    )


class _Seq:
    __slots__ = (
        "req",
        "stream",
        "h",
        "seed",
        "out",
        "blocks",
        "prefilled",
        "done",
        "kv",
        "matcher",
    )

    def __init__(self, req: EngineInput, stream: RequestStream, seed: int, blocks: int):
        self.req = req
        self.stream = stream
        self.seed = seed
        self.h = 0
        self.out: list[int] = []  # tokens generated
        self.blocks = blocks
        self.prefilled = False
        self.done = False
        self.kv = SeqBlocks([])  # set by the SeqTable
        self.matcher: Matcher | None = None  # a constrained request's grammar state


class MockerEngine(Engine):
    def __init__(self, config: MockerConfig, tokenizer) -> None:
        self.cfg = config
        self.vocab = tokenizer.output_vocab()
        self._vocab_at = {t: i for i, t in enumerate(self.vocab)}
        self.eos = tokenizer.eos_token_ids
        self.tokenizer = tokenizer
        self.grammars = EngineGrammars(tokenizer)
        self.table = SeqTable(
            config.kv_blocks, config.block_size, config.max_num_seqs, config.prefix_caching
        )
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._due = 0.0
        self._emitted = 0  # tokens emitted in all (for hang injection)
        self._prompt_tokens = dict.fromkeys(
            ("computed", "local_cache_hit", "external_kv_transfer"), 0
        )  # by where their KV came from, as vLLM counts them
        self._loop_time = time.monotonic  # replaced by the loop's clock in start()

    async def start(self) -> None:
        self._loop_time = asyncio.get_running_loop().time
        self._task = asyncio.create_task(self._loop(), name="mocker-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for rid in list(self.table.seqs):
            self.abort(rid)
        for key in list(self.table.held):
            self.release_kv(key)

    def stats(self) -> EngineStats:
        stats = self.table.stats()
        stats.prompt_tokens = dict(self._prompt_tokens)
        return stats

    def publish_kv_events(self, events: KvEvents) -> bool:
        if not self.cfg.prefix_caching:
            return False
        events.start(self.cfg.block_size, self.cfg.kv_blocks, self.table.cached_hashes())
        self.table.events = events
        return True

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    def _constraint(self, inp: EngineInput) -> Constraint | None:
        """The request's, or with --mocker-tool-calls the tool call it could make."""
        sp = inp.sampling
        return sp.constraint or (sp.tool_call if self.cfg.tool_calls else None)

    async def prepare(self, inp: EngineInput) -> None:
        await self.grammars.prepare(inp, self._constraint(inp))

    def add_request(self, req: EngineInput) -> RequestStream:
        sp = req.sampling
        if sp.penalized:
            raise EngineRequestError(
                "the mocker engine does not apply presence, frequency or repetition penalties"
            )
        blocks = self.table.blocks_for(req)
        if req.task is EngineTask.DECODE:
            if req.kv_payload != simulated_kv(req.token_ids, self.cfg.kv_bytes_per_token):
                raise EngineRequestError("KV payload does not belong to this request's tokens")
        matcher = self.grammars.matcher(req, self._constraint(req))
        stream = RequestStream(req.request_id)
        # Greedy output depends only on the engine seed; sampled output also on the request's.
        seed = self.cfg.seed if sp.greedy else self.cfg.seed ^ (sp.seed + 1)
        seq = _Seq(req, stream, seed, blocks)
        seq.matcher = matcher
        if req.prompt_logprobs is not None:  # deterministic like the tokens: no prefill needed
            h, lps = 0, []
            for i, t in enumerate(req.token_ids):
                h = fold(h, (t,))
                lps.append(self._logprob(h, t, req.prompt_logprobs) if i else None)
            stream.set_prompt_logprobs(lps)
        if req.task is EngineTask.DECODE:  # the KV arrived with the request: no prefill to do
            seq.h = fold(0, req.token_ids)
            seq.prefilled = True
        self.table.add(seq)
        self._wakeup.set()
        return stream

    def abort(self, request_id: str) -> bool:
        seq = self.table.seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, EngineFinish.ABORT)
        return True

    def export(self, request_id: str) -> bool:
        seq = self.table.seqs.get(request_id)
        if seq is None or seq.done or not seq.prefilled or seq.req.task is EngineTask.PREFILL:
            return False
        context = seq.req.token_ids + seq.out
        self.table.computed(seq, context)
        seq.done = True
        seq.stream.kv_key = self.table.hold(seq, context)
        seq.stream.kv_tokens = context
        seq.stream.finish(EngineFinish.EXPORTED)
        return True

    def kv_payload(self, key: str) -> bytes:
        return simulated_kv(self.table.held[key][1], self.cfg.kv_bytes_per_token)

    def kv_nbytes(self, key: str) -> int:
        return len(self.table.held[key][1]) * max(1, self.cfg.kv_bytes_per_token // 16) * 16

    def release_kv(self, key: str) -> bool:
        if not self.table.release(key):
            return False
        self._wakeup.set()
        return True

    def _hold(self, seq: _Seq) -> None:
        """A prefill is done: keep its blocks under a key until the KV is pulled or dropped."""
        seq.done = True
        seq.stream.kv_key = self.table.hold(seq, seq.req.token_ids)
        seq.stream.finish(EngineFinish.PREFILLED)

    def _finish(self, seq: _Seq, reason: EngineFinish) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.prefilled and seq.out:
            self.table.computed(seq, seq.req.token_ids + seq.out)
        self.table.remove(seq)
        seq.stream.finish(reason)
        self._wakeup.set()  # freed blocks may let a waiting request in

    def _emit(self, seq: _Seq) -> None:
        req = seq.req
        sp = req.sampling
        if seq.matcher is not None:
            tok = self._constrained(seq)
        else:
            tok = self.vocab[draw(seq.h, seq.seed, len(self.vocab))]
            if req.generated + len(seq.out) < sp.min_tokens:  # no stop token yet: draw again
                again = seq.h
                while tok in sp.stop_token_ids:
                    again = fold(again, (0,))
                    tok = self.vocab[draw(again, seq.seed, len(self.vocab))]
        seq.h = fold(seq.h, (tok,))
        seq.out.append(tok)
        self._emitted += 1
        seq.stream.push(
            tok, None if sp.logprobs is None else self._logprob(seq.h, tok, sp.logprobs)
        )
        done = finish_reason(
            tok, len(seq.out), req.max_tokens, sp.stop_token_ids, self.eos, sp.ignore_eos
        )
        if done is None and seq.matcher is not None and seq.matcher.done:
            done = FinishReason.STOP  # the grammar is whole (past EOS with ignore_eos)
        if done is not None:
            self._finish(seq, EngineFinish(done))

    def _constrained(self, seq: _Seq) -> int:
        """The grammar's choice: EOS as soon as the grammar allows it (so the output ends
        when it is whole), else a draw among the tokens it allows, a function of the
        context as ever."""
        m = seq.matcher
        assert m is not None
        allowed = m.allowed(self.tokenizer.vocab_size)
        sp = seq.req.sampling
        early = seq.req.generated + len(seq.out) < sp.min_tokens
        ends = [t for t in allowed if t in self.eos and not sp.ignore_eos and not early]
        if ends:
            tok = ends[0]
        else:
            banned = set(sp.stop_token_ids) | self.eos if early or sp.ignore_eos else set()
            pool = [t for t in allowed if t not in banned] or allowed
            tok = pool[draw(seq.h, seq.seed, len(pool))]
        m.accept(tok)
        return tok

    def _logprob(self, h: int, tok: int, k: int | None) -> Logprob:
        """Simulated, deterministic like the tokens: a function of the context (its hash
        `h` after `tok`) and the engine seed. The token is the most likely; the others of
        the top k are the next vocabulary entries, each less likely."""
        first = -(draw(h, self.cfg.seed ^ 0x5EED, 4096) + 1) / 4096  # in [-1, 0)
        k = k or 0
        vocab = self.vocab
        at = self._vocab_at.get(tok, 0)  # a prompt token may be no output token
        ids = [vocab[(at + j) % len(vocab)] for j in range(k)]
        return Logprob(first, ids, [first - j for j in range(k)])

    async def _sleep(self, seconds: float) -> None:
        # Sleep to a running deadline rather than for each interval: timers have about 1 ms
        # resolution, and sub-millisecond steps must still add up to the simulated time.
        now = self._loop_time()
        self._due = max(self._due, now) + max(seconds, 0.0) / self.cfg.speedup
        await asyncio.sleep(max(self._due - now, 0.0))

    async def _loop(self) -> None:
        cfg = self.cfg
        while True:
            if cfg.hang_after_tokens is not None and self._emitted >= cfg.hang_after_tokens:
                log.warning("fault injection: engine hangs after %d tokens", self._emitted)
                await asyncio.Event().wait()
            if not self.table.running and not self.table.waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            admitted = []
            counts = self._prompt_tokens
            for s in self.table.admit():
                n, cached = len(s.req.token_ids), s.kv.cached_tokens
                s.stream.cached_tokens = cached
                if s.prefilled:  # a decode: its KV came with the request
                    counts["external_kv_transfer"] += n
                    self.table.computed(s, s.req.token_ids)
                else:
                    counts["computed"] += n - cached
                    counts["local_cache_hit"] += cached
                    admitted.append(s)
            decoding = [s for s in self.table.running.values() if s.prefilled]
            if admitted:
                # Only the part of each prompt that is not cached costs prefill time.
                prompt_tokens = sum(len(s.req.token_ids) - s.kv.cached_tokens for s in admitted)
                for s in admitted:
                    s.h = fold(0, s.req.token_ids)
                await self._sleep(prompt_tokens / cfg.prefill_tps)
                for s in admitted:
                    if s.done:  # aborted during prefill
                        continue
                    s.prefilled = True
                    self.table.computed(s, s.req.token_ids)
                    if s.req.task is EngineTask.PREFILL:
                        self._hold(s)
                    elif s.req.max_tokens == 0:
                        self._finish(s, EngineFinish.LENGTH)
                    else:
                        self._emit(s)
            if decoding:
                step = cfg.step_ms / 1000.0 * (1.0 + cfg.batch_slowdown * (len(decoding) - 1))
                await self._sleep(step)
                for s in decoding:
                    if not s.done:
                        self._emit(s)
            elif not admitted:
                # Waiting requests that do not fit yet: wait for a finish to free blocks.
                self._wakeup.clear()
                await self._wakeup.wait()
