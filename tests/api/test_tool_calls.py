"""Tool calls through the openai client: `auto` parses the model's calls out of its answer
(the mocker told to call with --mocker-tool-calls), `required` and a named function
constrain decoding so a call always parses with valid arguments; whole and streamed; and a
full round trip: a call, the tool's answer, the final answer."""

from __future__ import annotations

import json

import openai
import pytest

pytest.importorskip("xgrammar")

MODEL = "segue-mocker"
TIDE = {
    "type": "object",
    "properties": {
        "port": {"type": "string", "enum": ["brest", "dover"]},
        "days": {"type": "integer", "maximum": 9},
    },
    "required": ["port", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "tide", "parameters": TIDE}},
    {
        "type": "function",
        "function": {"name": "wind", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK = [{"role": "user", "content": "when is high tide in brest"}]


@pytest.fixture
def tool_deploy(deploy):
    deploy.start_frontend()
    deploy.start_worker("--mocker-tool-calls", "true")
    return deploy


def client(d) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)


def check_call(call, names=("tide", "wind")) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    if call.function.name == "tide":
        assert args["port"] in ("brest", "dover") and isinstance(args["days"], int)
    return args


def streamed(c, **kw) -> tuple[dict[int, dict], dict[int, str], dict[int, str]]:
    calls: dict[int, dict] = {}
    content: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            for tc in ch.delta.tool_calls or []:
                got = calls.setdefault(ch.index * 100 + tc.index, {"arguments": ""})
                if tc.id:
                    got["id"], got["name"] = tc.id, tc.function.name
                got["arguments"] += tc.function.arguments or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return calls, content, finish


@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "tide"}}]
)
def test_tool_choice_whole_and_streamed_n3(tool_deploy, choice):
    c = client(tool_deploy)
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=200,
        temperature=0.8,
        seed=4,
        n=3,
    )
    whole = c.chat.completions.create(**kw)
    names = ("tide",) if isinstance(choice, dict) else ("tide", "wind")
    for ch in whole.choices:
        assert ch.finish_reason == "tool_calls", ch.message
        assert ch.message.content is None and len(ch.message.tool_calls) == 1
        check_call(ch.message.tool_calls[0], names)
    calls, content, finish = streamed(c, **kw)
    assert finish == {0: "tool_calls", 1: "tool_calls", 2: "tool_calls"}
    for ch in whole.choices:
        want = ch.message.tool_calls[0]
        got = calls[ch.index * 100]
        # the same call (ids are per request: this is another request)
        assert (got["name"], got["arguments"]) == (want.function.name, want.function.arguments)
        assert got["id"].startswith("call_") and got["id"].endswith("_0")
        assert content[ch.index] == ""


def test_without_the_flag_or_with_none_the_answer_is_text(agg2):
    c = client(agg2)  # no --mocker-tool-calls: the mocker answers in words
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=8)
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    forced = c.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    check_call(forced.choices[0].message.tool_calls[0])  # required: constrained, always a call


def test_a_full_round_trip(tool_deploy):
    c = client(tool_deploy)
    first = c.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "tide"}},
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    check_call(call, ("tide",))
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "high tide at 5 pm"},
    ]
    final = c.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=6
    )
    assert final.choices[0].finish_reason == "length" and final.choices[0].message.content
    assert not final.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "tsunami"}}}, "not in tools"),
        ({"tool_choice": "sometimes"}, "must be none, auto, required"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot be combined",
        ),
    ],
)
def test_bad_tool_choice_is_a_400_naming_it(agg2, extra, message):
    c = client(agg2)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=5, **extra)
    assert message in e.value.body["message"]
    assert e.value.body["param"] in ("tool_choice", "response_format")
