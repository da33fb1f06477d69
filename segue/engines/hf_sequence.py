"""One sequence of the hf engine: its request, its blocks, its context and how much of it is
computed, what it generated. Touched by the engine thread, and by the event loop under the
engine's lock."""

from __future__ import annotations

from typing import Any

from segue.engines.base import EngineInput, EngineTask, RequestStream
from segue.grammar import Matcher
from segue.protocol import Logprob


class Sequence:
    __slots__ = (
        "req",
        "stream",
        "blocks",
        "kv",
        "table",
        "ctx",
        "computed",
        "fed",
        "row",
        "plain",
        "draws",
        "gen",
        "out",
        "done",
        "imported",
        "prompt_lps",
        "matcher",
    )

    def __init__(self, req: EngineInput, stream: RequestStream, blocks: int) -> None:
        self.req, self.stream, self.blocks = req, stream, blocks
        self.table: list[int] = []  # block ids, from admission on
        self.gen = req.task is not EngineTask.PREFILL  # makes tokens (else: KV only)
        # the tokens whose KV this sequence computes: a prefill stops before the last
        self.ctx: list[int] = list(req.token_ids if self.gen else req.token_ids[:-1])
        self.computed = 0  # leading ctx tokens whose KV is in the blocks
        # positions whose KV a launched step computes (>= computed; one past the context
        # while a step feeds the token the step before it samples, still on the GPU)
        self.fed = 0
        self.row = 0  # where the last launched step left this sequence's sampled token
        # its tokens are the model's argmax or a seeded draw, nothing else: chosen on the
        # GPU, so a step of only such sequences can run while the CPU handles the one before
        sp = req.sampling
        self.plain = not self.gen or (
            not sp.penalized
            and sp.logprobs is None
            and sp.min_tokens <= req.generated
            and req.prompt_logprobs is None
            and sp.constraint is None
        )
        # a plain sequence that samples: its tokens are drawn on the device each step
        self.draws = self.gen and self.plain and not sp.greedy
        self.out: list[int] = []  # tokens generated
        self.done = False
        self.imported: list[Any] | None = None  # a DECODE's pulled K/V, written at admission
        # the prompt's logprobs as they are computed (the first token has none)
        self.prompt_lps: list[Logprob | None] | None = (
            [None] if req.prompt_logprobs is not None and self.gen else None
        )
        self.matcher: Matcher | None = None  # a constrained request's grammar state

    @property
    def pending(self) -> int:
        return len(self.ctx) - self.computed
