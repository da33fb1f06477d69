"""Token choice from one sequence's logits, for the hf engine: penalties and min_tokens as
vLLM applies them, seeded sampling, logprobs. Pure functions of torch tensors."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from segue.protocol import Logprob
from segue.sampling import SamplingParams


def processed(
    torch: Any,
    logits: Any,
    sp: SamplingParams,
    context: list[int],
    generated: list[int],
    eos: Collection[int],
) -> Any:
    """The logits with the request's penalties (repetition over the whole context, presence
    and frequency over `generated`, which includes a migrated request's earlier output)
    and, while `min_tokens` is not reached, no EOS or stop token."""
    x = logits.clone()
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(context)), device=x.device)
        v = x[seen]
        x[seen] = torch.where(v > 0, v / sp.repetition_penalty, v * sp.repetition_penalty)
    if (sp.presence_penalty or sp.frequency_penalty) and generated:
        ids, counts = torch.unique(torch.tensor(generated, device=x.device), return_counts=True)
        x[ids] -= sp.frequency_penalty * counts + sp.presence_penalty
    if len(generated) < sp.min_tokens:
        banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(eos))
        if banned:
            x[torch.tensor(banned, device=x.device)] = float("-inf")
    return x


def choose(
    torch: Any,
    logits: Any,
    greedy: int,
    sp: SamplingParams,
    context: list[int],
    generated: list[int],
    eos: Collection[int],
    position: int,
) -> int:
    """The next token of one sequence from its row of `logits` (already masked by its
    grammar, if any); `greedy`: the row's argmax, computed for the whole batch at once."""
    if sp.penalized or len(generated) < sp.min_tokens:
        x = processed(torch, logits, sp, context, generated, eos)
        return int(x.argmax()) if sp.greedy else sample(torch, x, sp, position)
    return greedy if sp.greedy else sample(torch, logits, sp, position)


def sample(torch: Any, logits: Any, sp: SamplingParams, position: int) -> int:
    """Seeded per (request seed, position), so a migrated request samples the same."""
    g = torch.Generator(device="cpu").manual_seed((sp.seed * 1_000_003 + position) % 2**63)
    probs = torch.softmax(logits.cpu() / sp.temperature, dim=-1)
    if sp.top_p < 1.0:
        p, i = torch.sort(probs, descending=True)
        keep = torch.cumsum(p, 0) - p < sp.top_p
        probs = torch.zeros_like(probs).scatter(0, i[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=g))


def logprob(torch: Any, logits: Any, tok: int, k: int) -> Logprob:
    """The token's log probability under the model (before temperature), and the top k;
    fp32 math, as vLLM reports them."""
    lps = torch.log_softmax(logits.float(), dim=-1)
    top = lps.topk(k) if k else None
    return Logprob(
        float(lps[tok]),
        top.indices.tolist() if top is not None else [],
        top.values.tolist() if top is not None else [],
    )
