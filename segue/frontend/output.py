"""Output processing: token ids -> text deltas, with stop strings and latency metrics.

Incremental detokenization never releases half of a UTF-8 character; stop strings are found
even when they span deltas; time to first token and inter-token latency are observed here,
where the client's tokens are produced.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from prometheus_client import Histogram

from segue.frontend.metrics import Tally
from segue.frontend.request import TokenDelta
from segue.protocol import FinishReason, Logprob
from segue.tokenizer import Tokenizer


@dataclass(slots=True)
class TextDelta:
    """What the renderer renders of one choice: its text and the tokens behind it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    start: int = 0  # index of its first token in the choice's output
    logprobs: list[Logprob] | None = None  # one per token, when the request asked
    prompt_logprobs: list[Logprob | None] | None = None  # echo: once, with the first tokens
    cached_tokens: int = 0  # with the finish: prompt tokens found in the worker's cache


_MAX_HELD_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half of a
    UTF-8 character (or of a merged word piece): text is released only once decoding the
    newest tokens no longer ends in a replacement character."""

    __slots__ = ("_tok", "ids", "_prefix", "_read")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self._tok.decode
        prefix_text = decode(self.ids[self._prefix : self._read])
        new_text = decode(self.ids[self._prefix :])
        # Hold back a trailing partial character, but never more than a character's worth
        # of tokens: a model emitting invalid byte sequences must not make this quadratic.
        held = len(self.ids) - self._read
        if len(new_text) > len(prefix_text) and (
            not new_text.endswith("\ufffd") or held > _MAX_HELD_TOKENS
        ):
            self._prefix = self._read
            self._read = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of a stream, release whatever is held back, broken or not."""
        rest = self._tok.decode(self.ids[self._prefix :])[
            len(self._tok.decode(self.ids[self._prefix : self._read])) :
        ]
        self._prefix = self._read = len(self.ids)
        return rest


class StopChecker:
    """Holds back just enough text to find stop strings that span deltas."""

    __slots__ = ("_stops", "_hold", "_pending")

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        keep = min(self._hold, len(buf))
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class OutputProcessor:
    """Turns a generation's token deltas into text deltas for one request."""

    def __init__(self, tokenizer: Tokenizer, ttft: Histogram, itl: Histogram) -> None:
        self.tok = tokenizer
        self.ttft = ttft
        self.itl = itl

    async def text_deltas(
        self,
        deltas: AsyncGenerator[TokenDelta, None],
        stops: list[str],
        per_token: bool = False,
        detok: IncrementalDetokenizer | None = None,
    ) -> AsyncGenerator[TextDelta, None]:
        """Yields text deltas (never empty unless they carry token ids or the finish);
        the last one has the finish reason. Closing it closes `deltas`. `per_token`: one
        delta per token, so where text deltas end does not depend on how the worker
        grouped tokens into frames (the Responses API numbers its events); `detok`: one
        that has seen the request's earlier tokens (a response taken over)."""
        detok = detok or IncrementalDetokenizer(self.tok)
        stopper = StopChecker(stops)
        start = last = time.perf_counter()
        first = True
        ttft, itl = self.ttft, Tally(self.itl)
        pos = 0
        try:
            async with contextlib.aclosing(deltas) as stream:
                async for d in stream:
                    ids, finish = d.token_ids, d.finish_reason
                    if ids:
                        now = time.perf_counter()
                        if first:
                            ttft.observe(now - start)
                            first = False
                        else:
                            itl.observe(now - last)
                        last = now
                    if per_token and len(ids) > 1:
                        lps = d.logprobs
                        for i, t in enumerate(ids[:-1]):
                            text, hit = stopper.feed(detok.add([t]))
                            at, pos = pos, pos + 1
                            one = lps[i : i + 1] if lps else None
                            plps = d.prompt_logprobs if i == 0 else None
                            if hit:
                                yield TextDelta(text, [t], FinishReason.STOP, at, one, plps)
                                return
                            yield TextDelta(text, [t], None, at, one, plps)
                        last_lps = lps[-1:] if lps else None
                        d = TokenDelta(ids[-1:], finish, last_lps, None, d.cached_tokens)
                        ids = d.token_ids
                    text, hit = stopper.feed(detok.add(ids))
                    at, pos = pos, pos + len(ids)
                    lps, plps = d.logprobs, d.prompt_logprobs
                    if hit:
                        yield TextDelta(text, ids, FinishReason.STOP, at, lps, plps)
                        return
                    if finish is not None:
                        text += stopper.feed(detok.flush())[0] + stopper.flush()
                        yield TextDelta(text, ids, finish, at, lps, plps, d.cached_tokens)
                        return
                    if text or ids:
                        yield TextDelta(text, ids, None, at, lps, plps)
        finally:
            itl.flush()  # what the stream observed, into the histogram
