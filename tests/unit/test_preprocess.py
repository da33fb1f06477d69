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
    assert state.seed == seed and encode_request(state.engine_request())


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
