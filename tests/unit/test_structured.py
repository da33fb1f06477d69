"""Structured outputs in one process: the API fields -> one `Constraint`, what cannot
compile refused with the compiler's message, and the mocker's constrained output: valid,
and the same whatever token a migration resumes it at."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from segue.api import openai as oai
from segue.engines.base import ConstraintRejected, EngineInput
from segue.engines.mocker import MockerConfig, MockerEngine
from segue.frontend.preprocess import decode_body
from segue.grammar import GrammarError, Grammars
from segue.sampling import Constraint, ConstraintKind, SamplingParams
from segue.tokenizer import BuiltinTokenizer

pytest.importorskip("xgrammar")

TOK = BuiltinTokenizer()
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "count": {"type": "integer"},
        "open": {"type": "boolean"},
    },
    "required": ["city", "count", "open"],
}
CONSTRAINTS = [
    Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)),
    Constraint(ConstraintKind.JSON_OBJECT),
    Constraint(ConstraintKind.REGEX, r"[a-f]{3,6}-[0-9]{2}"),
    Constraint(ConstraintKind.CHOICE, json.dumps(["north", "south", "east"])),
    Constraint(ConstraintKind.GRAMMAR, 'root ::= "(" inner ")"\ninner ::= "x" inner | "y"'),
]


def parse(raw: dict, chat: bool = True) -> tuple[Constraint | None, str]:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if not chat:
        base = {"model": "m", "prompt": "hi"}
    return oai.constraint(decode_body(json.dumps({**base, **raw}).encode(), chat))


def test_api_fields_become_one_constraint():
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}
    c, param = parse({"response_format": fmt})
    assert c is not None and c.kind is ConstraintKind.JSON_SCHEMA and param == "response_format"
    assert list(json.loads(c.spec)["properties"]) == ["city", "count", "open"]  # order kept
    assert parse({"response_format": {"type": "text"}})[0] is None
    assert parse({"response_format": {"type": "json_object"}}, chat=False)[0] == Constraint(
        ConstraintKind.JSON_OBJECT
    )
    c, param = parse({"structured_outputs": {"choice": ["a", "b"]}}, chat=False)
    assert c == Constraint(ConstraintKind.CHOICE, '["a","b"]') and param == "structured_outputs"
    assert parse({"structured_outputs": {"regex": "x+"}})[0] == Constraint(
        ConstraintKind.REGEX, "x+"
    )


@pytest.mark.parametrize(
    "raw, param, message",
    [
        ({"response_format": {"type": "xml"}}, "response_format", "must be text, json_object"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "not both",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ],
)
def test_ill_formed_constraints_are_400s_naming_the_field(raw, param, message):
    with pytest.raises(oai.APIError) as e:
        parse(raw)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def test_unsupported_vllm_options_are_refused():
    body = decode_body(
        b'{"model": "m", "prompt": "x", "structured_outputs": {"regex": "a", '
        b'"whitespace_pattern": " "}}',
        False,
    )
    err = oai.unsupported(body)
    assert err is not None and err.param == "structured_outputs.whitespace_pattern"


@pytest.mark.parametrize(
    "c, message",
    [
        (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": 5}'), "Type should be a string"),
        (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), ""),
        (Constraint(ConstraintKind.REGEX, "(ab"), "parenthesis is not closed"),
        (Constraint(ConstraintKind.GRAMMAR, "root ::= "), "EBNF parser error"),
        (Constraint(ConstraintKind.CHOICE, "[]"), "non-empty list"),
        (Constraint(ConstraintKind.REGEX, "a" * 70_000), "over 65536 bytes"),
        (Constraint(ConstraintKind.REGEX, "x{2}y{5,100000}"), "repetition count over 1000"),
    ],
)
def test_what_cannot_compile_is_a_grammar_error_with_the_compilers_message(c, message):
    with pytest.raises(GrammarError) as e:
        Grammars(TOK).compile(c)
    assert message in str(e.value) and not str(e.value).startswith("[")


def test_compiled_grammars_are_cached_with_a_bound():
    g = Grammars(TOK, capacity=2)
    a, b, c = CONSTRAINTS[2:5]
    g.compile(a)
    g.compile(a)
    assert g.compiles == 1  # a hit
    g.compile(b)
    g.compile(c)  # a goes: least recently used
    g.compile(b)
    assert g.compiles == 3
    g.compile(a)
    assert g.compiles == 4


def valid(c: Constraint, text: str) -> bool:
    if c.kind is ConstraintKind.JSON_SCHEMA:
        doc = json.loads(text)
        return set(doc) == {"city", "count", "open"} and isinstance(doc["count"], int)
    if c.kind is ConstraintKind.JSON_OBJECT:
        return isinstance(json.loads(text), dict)
    if c.kind is ConstraintKind.REGEX:
        return re.fullmatch(c.spec, text) is not None
    if c.kind is ConstraintKind.CHOICE:
        return text in json.loads(c.spec)
    return re.fullmatch(r"\(x*y\)", text) is not None


async def run(engine: MockerEngine, inp: EngineInput) -> tuple[list[int], str]:
    await engine.prepare(inp)
    stream = engine.add_request(inp)
    out: list[int] = []
    while True:
        o = await stream.get(10)
        assert o is not None
        out += o.token_ids
        if o.finish_reason is not None:
            return out, o.finish_reason.value


@pytest.mark.parametrize("c", CONSTRAINTS, ids=[c.kind.value for c in CONSTRAINTS])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_mocker_output_is_valid_and_resumes_exactly_at_every_token(c, temperature):
    engine = MockerEngine(MockerConfig(speedup=1e6), TOK)
    await engine.start()
    try:
        sp = SamplingParams(constraint=c, temperature=temperature, seed=11)
        prompt = TOK.encode("answer in the format")
        full, finish = await run(engine, EngineInput("a", prompt, 400, sp))
        if finish == "length":  # free-form JSON drawn at random can run long: a prefix
            assert c.kind is ConstraintKind.JSON_OBJECT and TOK.decode(full).startswith("{")
        else:
            assert finish == "stop" and full[-1] in TOK.eos_token_ids
            assert valid(c, TOK.decode(full)), TOK.decode(full)
        ks = range(1, len(full)) if len(full) <= 100 else [1, 2, len(full) // 2, len(full) - 1]
        for k in ks:  # a migration after each token
            rest, _ = await run(
                engine, EngineInput(f"m{k}", prompt + full[:k], 400 - k, sp, generated=k)
            )
            assert full[:k] + rest == full, k
        assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0
    finally:
        await engine.stop()


async def test_a_context_the_grammar_does_not_accept_is_refused_naming_the_request():
    engine = MockerEngine(MockerConfig(speedup=1e6), TOK)
    await engine.start()
    try:
        sp = SamplingParams(constraint=CONSTRAINTS[0])
        forged = TOK.encode("prompt") + TOK.encode('{"town"')
        with pytest.raises(ConstraintRejected, match="request forged: generated token"):
            await run(engine, EngineInput("forged", forged, 10, sp, generated=3))
        length, finish = await run(engine, EngineInput("short", TOK.encode("p"), 4, sp))
        assert finish == "length" and TOK.decode(length).startswith('{"')  # a valid prefix
    finally:
        await engine.stop()


def test_a_constraint_travels_whole_on_the_wire():
    from segue.protocol import EngineRequest, decode_request, encode_request

    sp = SamplingParams(constraint=CONSTRAINTS[0], temperature=0.5, seed=3)
    req = EngineRequest(request_id="r", token_ids=[1, 2], max_tokens=4, sampling=sp)
    assert decode_request(encode_request(req)).sampling == sp


def test_prepare_compiles_off_the_loop_and_refuses_with_the_request_id():
    engine = MockerEngine(MockerConfig(speedup=1e6), TOK)
    bad = SamplingParams(constraint=Constraint(ConstraintKind.REGEX, "(("))
    with pytest.raises(ConstraintRejected, match="request bad: "):
        asyncio.run(engine.prepare(EngineInput("bad", [5], 3, bad)))
