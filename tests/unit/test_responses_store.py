"""A response's events are a function of its tokens (not of how they were grouped into
frames), so a builder replaying stored tokens makes the stored events again (the store's
contract: tests/distributed/test_response_stores.py)."""

from __future__ import annotations

import msgspec

from segue.frontend.response_events import ResponseEvents
from segue.frontend.tool_calls import ToolCallParser, ToolParser
from segue.protocol import FinishReason
from segue.tokenizer import BuiltinTokenizer

TOK = BuiltinTokenizer()


def build(groups: list[list[int]], parser: bool = False) -> ResponseEvents:
    b = ResponseEvents(
        "resp_x", {"model": "m"}, 1, TOK, ToolCallParser(ToolParser.HERMES, "t") if parser else None
    )
    b.start()
    for g in groups:
        b.add(g)
    b.finish(FinishReason.STOP, 5, 0)
    return b


def test_events_are_a_function_of_the_tokens_not_their_frames():
    text = 'the sea <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call> and é'
    ids = TOK.encode(text, add_special_tokens=False)
    one = build([[t] for t in ids], parser=True).take()
    grouped = build([ids[:3], ids[3:4], ids[4:17], ids[17:]], parser=True).take()
    assert one == grouped
    kinds = [k for _, k, _ in one]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = msgspec.json.decode(one[-1][2])["response"]
    assert done["output"][1]["name"] == "f" and done["usage"]["output_tokens"] == len(ids)


def test_a_builder_replaying_stored_tokens_makes_the_stored_events_again():
    ids = TOK.encode("the river and the sea runs to the hills", add_special_tokens=False)
    first = ResponseEvents("resp_y", {}, 1, TOK, None)
    first.start()
    first.add(ids[:6])
    stored = first.take()
    replay = ResponseEvents("resp_y", {}, 1, TOK, None)
    replay.start()
    replay.add(list(first.tokens))
    assert replay.take() == stored and replay.seq == stored[-1][0]
    first.add(ids[6:])
    replay.add(ids[6:])
    assert first.take() == replay.take()
