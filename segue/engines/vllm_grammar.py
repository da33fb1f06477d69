"""Constrained decoding inside vLLM's engine core, continuing where a request's tokens left
its grammar.

vLLM's own structured outputs start the grammar at the root of whatever prompt a request
arrives with. A migrated request arrives with the tokens it already generated at the end of
its prompt, so vLLM's grammar would start again mid-answer (Dynamo's issue 7634: duplicated
or nested JSON). segue therefore does not use vLLM's structured outputs: this logits
processor, loaded into the engine core by its qualified name, gives every constrained
request a segue matcher (segue.grammar, xgrammar underneath) advanced over the last
`generated` tokens of its prompt, then over each token vLLM samples, and masks the batch's
logits with one bitmask per step. A fresh request (generated 0) and a continued one take the
same path, so an uninterrupted run and a migrated one apply the same masks.

The request's constraint travels in `SamplingParams.extra_args` (CONSTRAINT_KEY). Grammars are
compiled in the engine core on a request's first step (cached per constraint, with a bound);
the worker has already compiled the constraint once off its event loop to refuse what
cannot compile, so nothing that fails here was not seen there. A context the grammar does not
accept was refused by the worker first (segue.engines.constrained); if one still gets here
the row is left unmasked and logged, never a crash of the engine core.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from segue.engines.vllm import CONSTRAINT_KEY
from segue.grammar import GrammarError, Grammars, Matcher
from segue.sampling import Constraint, ConstraintKind
from segue.tokenizer import load_tokenizer

log = logging.getLogger("segue.vllm")


class _Row:
    __slots__ = ("matcher", "output", "seen")

    def __init__(self, matcher: Matcher, output: list[int]) -> None:
        self.matcher = matcher
        self.output = output  # vLLM's live list of the request's sampled tokens
        self.seen = 0  # how many of them the matcher has accepted


class GrammarLogitsProcessor(LogitsProcessor):
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        mc = vllm_config.model_config
        self.vocab_size = mc.get_vocab_size()
        self.grammars = Grammars(load_tokenizer(mc.model), self.vocab_size)
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def _row(self, params: Any, prompt: list[int] | None, output: list[int]) -> _Row | None:
        spec = (params.extra_args or {}).get(CONSTRAINT_KEY)
        if spec is None:
            return None
        kind, text, generated = spec
        done = list(prompt[len(prompt) - generated :]) if prompt and generated else []
        try:
            m = self.grammars.matcher(Constraint(ConstraintKind(kind), text), done)
        except GrammarError as e:  # the worker checked this first: only a bug gets here
            log.error("constrained request left unmasked: %s", e)
            return None
        return _Row(m, output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, prompt, output in batch_update.added:
                row = self._row(params, prompt, output)
                if row is None:
                    self.rows.pop(index, None)
                else:
                    self.rows[index] = row
            for a, b, direction in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if rb is not None and direction is MoveDirectionality.SWAP:
                    self.rows[a] = rb
        for row in self.rows.values():
            while row.seen < len(row.output):
                t = row.output[row.seen]
                if t < 0:  # a placeholder for a token not yet known
                    break
                row.seen += 1
                if not row.matcher.done and not row.matcher.accept(t):
                    log.error("sampled token %d is not accepted by its grammar", t)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
        rows = [i for i in self.rows if i < logits.shape[0]]
        for i in rows:
            self.rows[i].matcher.fill(bitmask, i)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
        return logits
