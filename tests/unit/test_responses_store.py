"""The Responses API's pieces in process: a response's events are a function of its tokens
(not of how they were grouped into frames), so a builder replaying stored tokens makes the
stored events again; the SQLite store writes an owner's batches only while it owns the
response, hands a silent one to exactly one claimer, keeps a cancel, expires and bounds."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from segue.frontend.response_events import ResponseEvents
from segue.frontend.response_store import ResponseStore, Status, Write
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


@pytest.fixture
def store(tmp_path):
    s = ResponseStore(tmp_path / "r.db", ttl=60, max_responses=3)
    yield s
    asyncio.run(s.close())


def test_only_the_owner_writes_and_one_claimer_takes_a_silent_response(store):
    async def go():
        await store.create("r1", b"{}", b"[]", b"{}", Status.IN_PROGRESS, True, "a")
        events = [(0, b'{"type":"response.created"}')]
        assert await store.append("r1", "a", events, b"{}", Status.IN_PROGRESS, b"[1]") is Write.OK
        assert await store.append("r1", "b", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        assert not await store.claim("r1", "b", stale_after=60)  # its owner beat just now
        await store.release("r1", "a")  # let go: claimable at once, by one claimer
        claims = await asyncio.gather(*(store.claim("r1", o, 60) for o in "bc"))
        assert sorted(claims) == [False, True]
        winner = "b" if claims[0] else "c"
        assert await store.append("r1", "a", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        got = await store.get("r1")
        assert got.owner == winner and got.last_seq == 0 and got.tokens == b"[1]"
        assert [s for s, _ in await store.events("r1", -1)] == [0]

    asyncio.run(go())


def test_cancel_sticks_and_a_finished_response_is_left_as_it_is(store):
    async def go():
        await store.create("r1", b"{}", b"[]", b'{"status":"queued"}', Status.QUEUED, True, "a")
        mark = lambda r: b'{"status":"cancelled"}'  # noqa: E731
        assert (await store.cancel("r1", mark)).status is Status.CANCELLED
        assert await store.append("r1", "a", [], b"{}", Status.IN_PROGRESS, b"[]") is Write.LOST
        await store.create("r2", b"{}", b"[]", b"{}", Status.IN_PROGRESS, True, "a")
        await store.append("r2", "a", [], b'{"s":1}', Status.COMPLETED, b"[]")
        again = await store.cancel("r2", mark)
        assert again.status is Status.COMPLETED and again.response == b'{"s":1}'
        assert await store.cancel("nope", mark) is None

    asyncio.run(go())


def test_expired_and_beyond_the_bound_are_gone(store):
    async def go():
        for i in range(4):  # max_responses 3: the oldest goes
            await store.create(f"r{i}", b"{}", b"[]", b"{}", Status.COMPLETED, False, "a")
        assert await store.get("r0") is None and await store.get("r3") is not None
        store.ttl = -1.0
        await store.create("late", b"{}", b"[]", b"{}", Status.COMPLETED, False, "a")
        assert await store.get("late") is None  # expired at once
        assert await store.get("r3") is not None  # kept for the ttl it was stored with

    asyncio.run(go())
