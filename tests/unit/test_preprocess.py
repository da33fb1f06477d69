"""Preprocessing at the edge: what a client sends that cannot be served is a 400 naming the
problem, never an exception further in (these two classes were 500s)."""

from __future__ import annotations

import pytest

from segue.api.openai import APIError
from segue.frontend.config import FrontendConfig
from segue.frontend.preprocess import Preprocessor, decode_body
from segue.protocol import encode_request
from segue.tokenizer import BuiltinTokenizer

_PRE = Preprocessor(FrontendConfig(), BuiltinTokenizer(), "segue-mocker")


def PRE(raw: bytes, chat: bool, rid: str):  # noqa: N802
    return _PRE(decode_body(raw, chat), chat, rid)


def body(extra: bytes = b"", prompt: bytes = b'"hi"', model: bytes = b"segue-mocker") -> bytes:
    return b'{"model": "' + model + b'", "prompt": ' + prompt + extra + b"}"


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70])
def test_seed_beyond_int64_is_a_400_naming_it(seed):
    with pytest.raises(APIError) as e:
        PRE(body(b', "seed": %d' % seed), False, "r")
    assert e.value.status == 400 and e.value.param == "seed"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), 0])
def test_seed_in_int64_reaches_the_wire(seed):
    state = PRE(body(b', "seed": %d' % seed), False, "r").state
    assert state.sampling.seed == seed and encode_request(state.engine_request())


@pytest.mark.parametrize(
    "raw", [body(prompt=b'"h\xff\xfei"'), body(model=b"segue\xc3"), body(b', "stop": ["\xc3"]')]
)
def test_bytes_that_are_not_utf8_are_a_400(raw):
    with pytest.raises(APIError) as e:
        PRE(raw, False, "r")
    assert e.value.status == 400 and e.value.code == "invalid_encoding"


def test_a_million_nested_lists_is_a_400_not_a_recursion_error():
    deep = b"[" * 1_000_000 + b"]" * 1_000_000
    with pytest.raises(APIError) as e:
        PRE(body(prompt=deep), False, "r")
    assert e.value.status == 400 and "nested too deeply" in e.value.message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (b', "presence_penalty": 2.5', "presence_penalty"),
        (b', "repetition_penalty": 0', "repetition_penalty"),
        (b', "min_tokens": -1', "min_tokens"),
        (b', "logprobs": 21', "logprobs"),
        (b', "logit_bias": {"5": 10}', "logit_bias"),
        (b', "best_of": 3', "best_of"),
        (b', "stop_token_ids": [99999999]', "stop_token_ids"),
    ],
)
def test_what_no_engine_honours_is_a_400_naming_it(extra, param):
    with pytest.raises(APIError) as e:
        PRE(body(extra), False, "r")
    assert e.value.status == 400 and e.value.param == param


def test_neutral_values_and_ignored_fields_are_accepted():
    extra = (
        b', "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1,'
        b' "min_tokens": 0, "best_of": 1, "user": "u",'
        b' "metadata": {"k": "v"}, "store": false, "stop_token_ids": [7, 9]'
    )
    state = PRE(body(extra), False, "r").state
    assert state.sampling.stop_token_ids == [7, 9]
    req = PRE(body(b', "presence_penalty": 0.5, "min_tokens": 3'), False, "r").state
    assert req.engine_request().sampling.presence_penalty == 0.5
    assert req.engine_request().sampling.min_tokens == 3


def chat(extra: bytes) -> bytes:
    return (
        b'{"model": "segue-mocker", "messages": [{"role": "user", "content": "hi"}]' + extra + b"}"
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (b', "response_format": {"type": "yaml"}', "response_format"),
        (b', "tool_choice": "required"', "tool_choice"),
        (b', "top_logprobs": 2', "top_logprobs"),
        (b', "logprobs": 3', "logprobs"),
        (b', "tools": [{"type": "retrieval", "function": {"name": "f"}}]', "tools[0].type"),
    ],
)
def test_chat_features_no_engine_honours_are_400s(extra, param):
    with pytest.raises(APIError) as e:
        PRE(chat(extra), True, "r")
    assert e.value.status == 400 and e.value.param == param


def test_tools_reach_the_chat_template():
    import jinja2

    tok = BuiltinTokenizer()
    tok._template = jinja2.Environment().from_string(
        "{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    pre = Preprocessor(FrontendConfig(), tok, "segue-mocker")
    tools = b', "tools": [{"type": "function", "function": {"name": "get_tide"}}]'
    for extra, want in ((tools, "[tool get_tide]hi"), (b"", "hi")):
        prep = pre(decode_body(chat(extra + b', "tool_choice": "auto"'), True), True, "r")
        assert tok.decode(prep.state.prompt_ids) == want
