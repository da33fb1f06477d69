"""Structured outputs through the openai client on real frontend and mocker processes:
`response_format` (what `chat.completions.parse` sends for a Pydantic model) and vLLM's
`structured_outputs`, whole and streamed, with several choices; what cannot compile is a 400
naming its field before any worker is called."""

from __future__ import annotations

import json
import re

import openai
import pydantic
import pytest
from faults import metric

pytest.importorskip("xgrammar")

MODEL = "segue-mocker"


class Station(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    depth: int
    open: bool


def client(d) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_model(agg2):
    c = client(agg2)
    r = c.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "a station, as JSON"}],
        response_format=Station,
        max_tokens=200,
        temperature=0,
    )
    ch = r.choices[0]
    assert ch.finish_reason == "stop"
    assert isinstance(ch.message.parsed, Station)
    assert Station.model_validate_json(ch.message.content) == ch.message.parsed
    assert len(ch.message.parsed.name) <= 10


def test_structured_outputs_on_completions_whole_and_streamed(agg2):
    c = client(agg2)
    cases = [
        ({"regex": r"[a-f]{2,4}-[0-9]{3}"}, lambda t: re.fullmatch(r"[a-f]{2,4}-[0-9]{3}", t)),
        ({"choice": ["alpha", "beta", "gamma"]}, lambda t: t in ("alpha", "beta", "gamma")),
        ({"grammar": 'root ::= "<" ("x" | "y")+ ">"'}, lambda t: re.fullmatch(r"<[xy]+>", t)),
        ({"json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, json.loads),
    ]
    for so, ok in cases:
        kw = dict(
            model=MODEL,
            prompt="say it",
            max_tokens=100,
            temperature=0.8,
            seed=3,
            n=3,
            extra_body={"structured_outputs": so, "return_token_ids": True},
        )
        whole = c.completions.create(**kw)
        texts = ["", "", ""]
        for chunk in c.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                texts[ch.index] += ch.text
        for ch in whole.choices:
            assert ch.finish_reason == "stop", (so, ch.text)
            assert ok(ch.text), (so, ch.text)
            assert texts[ch.index] == ch.text  # streamed is the same answer
        assert len({ch.text for ch in whole.choices}) >= 2  # seeds 3, 4, 5 sample apart


def test_json_object_chat_streamed_n3(agg2):
    c = client(agg2)
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "an object"}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0.7,
        seed=9,
        n=3,
    )
    whole = c.chat.completions.create(**kw)
    texts = ["", "", ""]
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    for ch in whole.choices:
        if ch.finish_reason == "stop":
            assert isinstance(json.loads(ch.message.content), dict)
        assert texts[ch.index] == ch.message.content


@pytest.mark.parametrize(
    "extra, param, message",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
            "response_format",
            "Type should be a string",
        ),
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "not closed"),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "EBNF"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
        (
            {"structured_outputs": {"regex": "a", "json_object": True}},
            "structured_outputs",
            "exactly one",
        ),
    ],
)
def test_what_cannot_compile_is_a_400_before_any_worker(agg2, extra, param, message):
    c = client(agg2)
    before = sum(metric(w, "segue_worker_requests_total") for w in agg2.workers)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=extra)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and message in err["message"]
    assert sum(metric(w, "segue_worker_requests_total") for w in agg2.workers) == before
