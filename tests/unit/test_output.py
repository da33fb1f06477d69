"""Output processing on its own: token deltas in, text deltas out."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from prometheus_client import CollectorRegistry, Histogram

from segue.frontend.output import OutputProcessor, TextDelta
from segue.frontend.request import TokenDelta
from segue.protocol import FinishReason
from segue.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()


def processor() -> tuple[OutputProcessor, CollectorRegistry]:
    r = CollectorRegistry()
    return OutputProcessor(
        TOK, Histogram("ttft", "", registry=r), Histogram("itl", "", registry=r)
    ), r


class Upstream:
    """A generation that yields one token per delta and records whether it was closed."""

    def __init__(self, ids: list[int], finish: FinishReason = FinishReason.LENGTH) -> None:
        self.ids, self.finish = ids, finish
        self.closed = False
        self.sent = 0

    async def gen(self) -> AsyncGenerator[TokenDelta, None]:
        try:
            for t in self.ids:
                self.sent += 1
                yield TokenDelta([t])
            yield TokenDelta([], self.finish)
        finally:
            self.closed = True


async def collect(text: str, stops: list[str]) -> tuple[list[TextDelta], Upstream, float]:
    proc, reg = processor()
    up = Upstream(TOK.encode(text, add_special_tokens=False))
    out = [d async for d in proc.text_deltas(up.gen(), stops)]
    return out, up, reg.get_sample_value("ttft_count") or 0.0


async def test_utf8_split_across_tokens_is_never_half_sent():
    text = "caf\u00e9 \u2603 na\u00efve \U0001f600 done"
    ids = TOK.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters are several byte tokens
    out, _, ttft = await collect(text, [])
    assert all("\ufffd" not in d.text for d in out)
    assert "".join(d.text for d in out) == text
    assert out[-1].finish_reason == FinishReason.LENGTH
    assert sum(len(d.token_ids) for d in out) == len(ids) and ttft == 1


async def test_stop_string_across_deltas_cuts_and_closes_upstream():
    text = "the river and the sea and the sky"
    out, up, _ = await collect(text, ["and the s"])
    assert "".join(d.text for d in out) == "the river "
    assert out[-1].finish_reason == FinishReason.STOP
    assert up.closed and up.sent < len(TOK.encode(text, add_special_tokens=False))


async def test_held_back_text_is_released_at_the_end():
    text = "the river an"
    out, _, _ = await collect(text, ["and"])  # "an" may start "and": held until the end
    assert "".join(d.text for d in out) == text
    assert out[-1].finish_reason == FinishReason.LENGTH
