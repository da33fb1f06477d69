"""A response's events are a function of its tokens (not of how they were grouped into
frames), so a builder replaying stored tokens makes the stored events again (the store's
contract: tests/distributed/test_response_stores.py)."""

from __future__ import annotations

import asyncio

import msgspec
from prometheus_client import CollectorRegistry, Histogram

from segue.frontend.output import OutputProcessor
from segue.frontend.request import TokenDelta
from segue.frontend.response_events import ResponseEvents
from segue.frontend.tool_calls import ToolCallParser, ToolParser
from segue.protocol import FinishReason
from segue.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()


def build(frames: list[list[int]], parser: bool = False) -> ResponseEvents:
    """A response whose tokens arrive in `frames`, through the frontend's output path."""
    b = ResponseEvents(
        "resp_x", {"model": "m"}, 1, TOK, ToolCallParser(ToolParser.HERMES, "t") if parser else None
    )
    b.start()
    r = CollectorRegistry()
    out = OutputProcessor(TOK, Histogram("ttft", "", registry=r), Histogram("itl", "", registry=r))

    async def tokens():
        for f in frames:
            yield TokenDelta(f)
        yield TokenDelta([], FinishReason.STOP)

    async def run() -> None:
        async for d in out.text_deltas(tokens(), [], per_token=True, detok=b.detok):
            b.add(d.token_ids, d.text)
            if d.finish_reason is not None:
                b.finish(d.finish_reason, 5, 0)

    asyncio.run(run())
    return b


def test_events_are_a_function_of_the_tokens_not_their_frames():
    text = 'the sea <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call> and é'
    ids = TOK.encode(text, add_special_tokens=False)
    one = build([[t] for t in ids], parser=True).take()
    grouped = build([ids[:3], ids[3:4], ids[4:17], ids[17:]], parser=True).take()
    assert one == grouped
    for _, _, data in one:  # the fast path of a delta event makes what encoding would
        assert msgspec.json.encode(msgspec.json.decode(data)) == data
    kinds = [k for _, k, _ in one]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = msgspec.json.decode(one[-1][2])["response"]
    assert done["output"][1]["name"] == "f" and done["usage"]["output_tokens"] == len(ids)
    assert done["output"][0]["content"][0]["text"] + done["output"][2]["content"][0]["text"] == (
        "the sea  and é"
    )


def test_a_builder_replaying_stored_tokens_makes_the_stored_events_again():
    ids = TOK.encode("the river and the sea runs to the hills", add_special_tokens=False)
    first = ResponseEvents("resp_y", {}, 1, TOK, None)
    first.start()
    first.replay(ids[:6])
    stored = first.take()
    replay = ResponseEvents("resp_y", {}, 1, TOK, None)
    replay.start()
    replay.replay(list(first.tokens))
    assert replay.take() == stored and replay.seq == stored[-1][0]
    first.replay(ids[6:])
    replay.replay(ids[6:])
    assert first.take() == replay.take()
