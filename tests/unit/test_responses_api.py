"""A Responses request as the chat completion that generates it: the instructions, a
previous response's conversation, function calls and their outputs as messages; tools,
tool_choice and text.format in chat's shapes; each bad input a 400 naming it."""

from __future__ import annotations

import msgspec
import pytest

from segue.api import openai as oai
from segue.api import responses as rapi


def req(**kw) -> rapi.ResponsesRequest:
    return msgspec.convert({"model": "m", **kw}, rapi.ResponsesRequest)


def test_the_conversation_becomes_messages():
    body = req(input="and now?", instructions="be brief")
    earlier = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "tide", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "4 m"},
    ]
    chat = rapi.chat_request(body, earlier + rapi.input_items(body), "resp_1")
    roles = [m.role for m in chat.messages]
    assert roles == ["system", "user", "assistant", "tool", "user"]
    assert chat.messages[0].content == "be brief" and chat.messages[1].content == "hi"
    assert chat.messages[2].tool_calls == [
        {"id": "c1", "type": "function", "function": {"name": "tide", "arguments": "{}"}}
    ]
    assert chat.messages[3].tool_call_id == "c1" and chat.messages[4].content == "and now?"
    assert chat.seed == rapi.seed_of("resp_1") != rapi.seed_of("resp_2")


def test_tools_choice_and_format_in_chat_shapes():
    schema = {"type": "object"}
    body = req(
        input="x",
        max_output_tokens=7,
        tools=[{"type": "function", "name": "tide", "parameters": schema}],
        tool_choice={"type": "function", "name": "tide"},
        text={"format": {"type": "json_schema", "name": "r", "schema": schema, "strict": True}},
    )
    chat = rapi.chat_request(body, rapi.input_items(body), "resp_1")
    assert chat.max_tokens == 7 and chat.tools[0].function.name == "tide"
    assert chat.tool_choice == {"type": "function", "function": {"name": "tide"}}
    assert chat.response_format.type == "json_schema"
    assert chat.response_format.json_schema.schema == schema


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "image"}]}, "input[0].type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id"),
    ],
)
def test_bad_input_is_a_400_naming_it(body, param):
    with pytest.raises(oai.APIError) as e:
        rapi.input_items(req(**body))
    assert e.value.status == 400 and e.value.param == param


def test_an_unknown_field_is_refused_by_name():
    with pytest.raises(msgspec.ValidationError, match="reasoning"):
        rapi.decoder.decode(b'{"model": "m", "input": "x", "reasoning": {}}')
