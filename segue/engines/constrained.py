"""What an engine does for a constrained request (segue.grammar): compile its grammar off
the event loop before the request is added, then give it a matcher advanced over the tokens
it already generated (a migrated request's earlier output), so that it goes on exactly
where they left the grammar."""

from __future__ import annotations

import asyncio
from typing import Any

from segue.engines.base import ConstraintRejected, EngineInput, EngineTask
from segue.grammar import GrammarError, Grammars, Matcher
from segue.sampling import Constraint
from segue.tokenizer import Tokenizer


class EngineGrammars:
    def __init__(self, tok: Tokenizer, vocab_size: int | None = None) -> None:
        self.grammars = Grammars(tok, vocab_size)

    async def prepare(self, inp: EngineInput, c: Constraint | None = None) -> None:
        """`c`: the constraint to apply, when not the request's own."""
        c = c or inp.sampling.constraint
        if c is None or inp.task is EngineTask.PREFILL:
            return
        try:
            await asyncio.to_thread(self.grammars.compile, c)
        except GrammarError as e:
            raise ConstraintRejected(f"request {inp.request_id}: {e}") from None

    def matcher(self, inp: EngineInput, c: Constraint | None = None) -> Matcher | None:
        """The request's matcher (None: unconstrained, or a prefill, which makes no token);
        raises ConstraintRejected naming the request when its context does not match."""
        c = c or inp.sampling.constraint
        if c is None or inp.task is EngineTask.PREFILL:
            return None
        generated = inp.token_ids[len(inp.token_ids) - inp.generated :] if inp.generated else []
        try:
            return self.grammars.matcher(c, generated)
        except GrammarError as e:
            raise ConstraintRejected(f"request {inp.request_id}: {e}") from None


def mask_logits(logits: Any, rows: list[tuple[int, Matcher]]) -> None:
    """Sets what each row's grammar forbids next to -inf in `logits` (a batch's), all rows
    at once: xgrammar's kernel, on the logits' device (CPU or GPU)."""
    if not rows:
        return
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, m in rows:
        m.fill(bitmask, row)
    xgrammar.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device), indices=[row for row, _ in rows]
    )
