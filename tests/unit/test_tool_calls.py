"""Tool calls read out of streamed text: however the text is split into deltas, the same
content and calls come out (which is what makes a migrated stream's deltas exact)."""

from __future__ import annotations

import json

import pytest

from segue.frontend.tool_calls import ToolCallParser, ToolParser

HERMES = (
    'Let me look. <tool_call>\n{"name": "tide", "arguments": {"port": "brest"}}\n</tool_call>'
    '<tool_call>{"name": "wind", "arguments": {}}</tool_call> done <tool'
)


def parse(kind: ToolParser, text: str, cuts: list[int]) -> tuple[str, list]:
    p = ToolCallParser(kind, "t")
    content, calls = "", []
    last = 0
    for cut in [*cuts, len(text)]:
        c, got = p.feed(text[last:cut])
        content += c
        calls += got
        last = cut
    c, got = p.finish()
    return content + c, calls + got


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_calls_and_content_whatever_the_deltas(step):
    content, calls = parse(ToolParser.HERMES, HERMES, list(range(step, len(HERMES), step)))
    assert content == "Let me look.  done <tool"  # a cut-off tag at the end stays content
    assert [(c.index, c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        (0, "call_t_0", "tide", {"port": "brest"}),
        (1, "call_t_1", "wind", {}),
    ]


def test_hermes_holds_back_only_what_may_start_a_call():
    p = ToolCallParser(ToolParser.HERMES, "t")
    assert p.feed("the <to") == ("the ", [])
    assert p.feed("wer is tall") == ("<tower is tall", [])
    assert p.feed("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert p.finish() == ("", [])


def test_an_unfinished_call_is_content():
    assert parse(ToolParser.HERMES, 'a <tool_call>{"name": "x"', [4]) == (
        'a <tool_call>{"name": "x"',
        [],
    )


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_llama3_json_calls(step):
    text = '<|python_tag|>{"name": "tide", "parameters": {"port": "dover"}}; {"name": "w"}'
    content, calls = parse(ToolParser.LLAMA3_JSON, text, list(range(step, len(text), step)))
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("tide", {"port": "dover"}),
        ("w", {}),
    ]
    plain = "the sea is calm"
    assert parse(ToolParser.LLAMA3_JSON, plain, [3, 8]) == (plain, [])
    assert parse(ToolParser.LLAMA3_JSON, "{broken", [2]) == ("{broken", [])
