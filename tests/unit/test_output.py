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


async def test_inter_token_latency_reaches_the_histogram_when_the_stream_ends():
    """One gap per token after the first, observed once the stream is done (or cut by a
    stop string), none lost."""
    proc, reg = processor()
    up = Upstream(TOK.encode("the cat sat on the mat", add_special_tokens=False))
    [d async for d in proc.text_deltas(up.gen(), [])]
    first = len(up.ids) - 1
    assert reg.get_sample_value("itl_count") == first
    assert reg.get_sample_value("ttft_count") == 1
    up = Upstream(TOK.encode("one two three four", add_special_tokens=False))
    [d async for d in proc.text_deltas(up.gen(), [" three"])]  # stops at the 3rd token
    assert up.sent == 3 and reg.get_sample_value("itl_count") == first + 2


def test_a_tally_adds_what_the_histogram_would_have_observed():
    from segue.frontend.metrics import Tally

    values = [0.0001, 0.0005, 0.0007, 0.003, 0.003, 0.02, 0.3, 7.0, 0.0005, 1e-9]
    r = CollectorRegistry()
    direct = Histogram("direct", "", registry=r, buckets=(0.0005, 0.001, 0.005, 0.1, 1))
    tallied = Histogram("tallied", "", registry=r, buckets=(0.0005, 0.001, 0.005, 0.1, 1))
    tally = Tally(tallied, every=4)
    for v in values:
        direct.observe(v)
        tally.observe(v)
    assert r.get_sample_value("tallied_count") == 8  # flushed every 4
    tally.flush()
    tally.flush()  # nothing left: adds nothing

    def samples(name: str) -> dict:
        return {
            (s.name.removeprefix(name), tuple(sorted(s.labels.items()))): round(s.value, 12)
            for m in r.collect()
            if m.name == name
            for s in m.samples
            if not s.name.endswith("_created")
        }

    assert samples("tallied") == samples("direct")
