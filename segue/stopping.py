"""When a sequence is over: the one place that decides it for token ids (the engines that
schedule themselves use it per token; the frontend uses it to tell a stream that broke after
its last token from one that broke before). Stop strings are text and live in the frontend's
output processing."""

from __future__ import annotations

from collections.abc import Collection

from segue.protocol import FinishReason


def finish_reason(
    token: int,
    n_generated: int,
    max_tokens: int,
    stop_token_ids: Collection[int],
    eos_token_ids: Collection[int],
    ignore_eos: bool,
) -> FinishReason | None:
    """The finish reason once `token` is the `n_generated`-th output token, else None."""
    if token in stop_token_ids or (not ignore_eos and token in eos_token_ids):
        return FinishReason.STOP
    if n_generated >= max_tokens:
        return FinishReason.LENGTH
    return None
