"""Token choice from one sequence's logits, for the hf engine: penalties and min_tokens as
vLLM applies them, seeded sampling, logprobs. Pure functions of torch tensors.

Sampling draws by the Gumbel-max trick with noise that is a hash of (request seed, position,
token id): one draw from softmax(logits / temperature), cut to top_p, the same on any worker
and in any batch, so a migrated request samples as the first worker would have, and a batch
of rows samples in a few tensor operations on the logits' device (no copy to the host)."""

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


M32 = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """(x * c) mod 2**32 for x < 2**32 without leaving int64's range."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & M32


def _mix(x: Any) -> Any:
    """A 32-bit integer hash (Wellons' lowbias32) over int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def key_parts(seeds: list[int], positions: list[int]) -> list[tuple[int, int, int]]:
    """What a row's key is made of: its request's seed (any int) in two 32-bit halves and
    the token's position; for `row_keys`, as a long tensor on the logits' device."""
    out = []
    for seed, pos in zip(seeds, positions, strict=True):
        seed &= 2**64 - 1
        out.append((seed & M32, seed >> 32, pos & M32))
    return out


def row_keys(parts: Any) -> Any:
    """Each row's 32-bit key from its `key_parts` ([R, 3])."""
    return _mix(parts[:, 0] ^ _mix(parts[:, 1] ^ _mix((parts[:, 2] + 0x9E3779B9) & M32)))


def sample_rows(torch: Any, logits: Any, temps: Any, top_ps: Any, keys: Any, cut: bool) -> Any:
    """One token per row of `logits` [R, V]: `temps`, `top_ps` [R] (float), `keys` [R]
    (`row_keys`); `cut`: some row has top_p < 1. Stays on the logits' device."""
    x = logits.float() / temps[:, None]
    if cut:  # keep the most likely tokens whose probabilities before them sum below top_p
        p, order = torch.sort(torch.softmax(x, dim=-1), dim=-1, descending=True)
        keep = torch.cumsum(p, -1) - p < top_ps[:, None]
        x = x.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), float("-inf"))
    vocab = torch.arange(x.shape[-1], device=x.device, dtype=torch.long)
    bits = _mix(_mix(vocab)[None, :] ^ keys[:, None]) >> 8  # 24 random bits per token
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return torch.argmax(x - torch.log(-torch.log(u)), dim=-1)


def sample(torch: Any, logits: Any, sp: SamplingParams, position: int) -> int:
    """One sequence's draw (`sample_rows` of one row): the same token the batched path
    gives it."""
    dev = logits.device
    temps = torch.tensor([sp.temperature], device=dev)
    top_ps = torch.tensor([sp.top_p], device=dev)
    keys = row_keys(torch.tensor(key_parts([sp.seed], [position]), device=dev))
    return int(sample_rows(torch, logits[None], temps, top_ps, keys, sp.top_p < 1.0)[0])


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
