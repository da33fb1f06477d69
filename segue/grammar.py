"""Constrained decoding with xgrammar (the grammar engine of vLLM, SGLang and TensorRT-LLM):
a `Constraint` compiled for one tokenizer's vocabulary, and a matcher per request that says
which tokens may come next.

The frontend compiles each new constraint once to refuse what cannot compile (a 400 before
any worker is called); each engine compiles it again for its own vocabulary, cached with a
bound. A request that arrives with generated tokens (a migration, a hand-back, a live move,
a disaggregated decode) gets a matcher advanced over those tokens first, so the grammar goes
on from where they left it; tokens the grammar does not accept are an error naming the
request, never different output. xgrammar (and the torch it needs) is imported on first use.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

from segue.sampling import Constraint, ConstraintKind
from segue.tokenizer import BuiltinTokenizer, HFTokenizer, Tokenizer

MAX_SPEC_BYTES = 64 * 1024  # a schema, regex or grammar longer than this is refused
# A regex's `{n,m}` is expanded by the compiler: seconds at 10^5, more beyond; refused
MAX_REPEAT = 1000
_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[03:44:17] /x/y.cc:83: "


class GrammarError(ValueError):
    """The constraint cannot compile, or tokens do not match it."""


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise GrammarError(
            "structured outputs need xgrammar on this process: pip install 'segue[structured]'"
        ) from None
    return xgrammar


def _message(e: Exception) -> str:
    return _XGR_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def tokenizer_info(tok: Tokenizer, vocab_size: int | None = None) -> Any:
    """xgrammar's view of a vocabulary (`vocab_size`: the model's logits, when larger)."""
    xgr = _xgr()
    stops = sorted(tok.eos_token_ids)
    if isinstance(tok, BuiltinTokenizer):
        return xgr.TokenizerInfo(
            tok.pieces,
            xgr.VocabType.RAW,
            vocab_size=vocab_size or tok.vocab_size,
            stop_token_ids=stops,
        )
    if isinstance(tok, HFTokenizer):
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
        return xgr.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab_size or tok.vocab_size, stop_token_ids=stops
        )
    raise GrammarError(f"no grammar support for the tokenizer {type(tok).__name__}")


def check_spec(c: Constraint) -> None:
    """What can be refused without compiling."""
    if len(c.spec.encode()) > MAX_SPEC_BYTES:
        raise GrammarError(f"the {c.kind.value} is over {MAX_SPEC_BYTES} bytes")
    if c.kind is ConstraintKind.REGEX:
        for low, high in _REPEAT.findall(c.spec):
            if max(int(low), int(high or 0)) > MAX_REPEAT:
                raise GrammarError(f"a repetition count over {MAX_REPEAT} in the regex")
    if c.kind is ConstraintKind.CHOICE:
        choices = json.loads(c.spec)
        if not choices or not all(isinstance(x, str) for x in choices):
            raise GrammarError("choice must be a non-empty list of strings")


def _ebnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def tool_call_spec(fmt: str, tools: list[tuple[str, Any]]) -> str:
    """The TOOL_CALL constraint's spec for (name, parameters schema) tools."""
    any_object = {"type": "object"}
    listed = [{"name": n, "parameters": any_object if p is None else p} for n, p in tools]
    return json.dumps({"format": fmt, "tools": listed})


def _tool_call_grammar(xgr: Any, spec: str) -> Any:
    """One call of one of the tools: hermes `<tool_call>\n{"name": N, "arguments": A}
    \n</tool_call>`, llama3_json `{"name": N, "parameters": A}`; A valid for N's schema."""
    doc = json.loads(spec)
    key = "parameters" if doc["format"] == "llama3_json" else "arguments"
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, key: t["parameters"]},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for t in doc["tools"]
        ]
    }
    body = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    if key == "parameters":
        return body
    return xgr.Grammar.concat(
        xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
        body,
        xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'),
    )


class Grammars:
    """Compiled constraints for one vocabulary, at most `capacity` kept (least recently
    used first out). Thread-safe: compiles run off the event loop."""

    def __init__(self, tok: Tokenizer, vocab_size: int | None = None, capacity: int = 128):
        self.tok = tok
        self.vocab_size = vocab_size
        self.capacity = capacity
        self._compiler: Any = None
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # cache misses, for tests and benchmarks

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = tokenizer_info(self.tok, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def compile(self, c: Constraint) -> Any:
        """The compiled grammar; raises GrammarError with the compiler's message."""
        with self._lock:
            hit = self._cache.get(c)
            if hit is not None:
                self._cache.move_to_end(c)
                return hit
        try:
            check_spec(c)
            compiled = self._compile(self._get_compiler(), c)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(_message(e)) from None
        with self._lock:
            self.compiles += 1
            self._cache[c] = compiled
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return compiled

    @staticmethod
    def _compile(compiler: Any, c: Constraint) -> Any:
        kind = c.kind
        if kind is ConstraintKind.JSON_SCHEMA:
            return compiler.compile_json_schema(c.spec, any_whitespace=False)
        if kind is ConstraintKind.JSON_OBJECT:
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind is ConstraintKind.REGEX:
            return compiler.compile_regex(c.spec)
        if kind is ConstraintKind.CHOICE:
            choices = json.loads(c.spec)
            return compiler.compile_grammar(
                "root ::= " + " | ".join(_ebnf_literal(x) for x in choices)
            )
        if kind is ConstraintKind.TOOL_CALL:
            return compiler.compile_grammar(_tool_call_grammar(_xgr(), c.spec))
        return compiler.compile_grammar(c.spec, root_rule_name="root")

    def matcher(self, c: Constraint, generated: list[int]) -> Matcher:
        """A matcher at the state after `generated`; GrammarError if they do not match."""
        m = Matcher(self.compile(c))
        for i, t in enumerate(generated):
            if not m.accept(t):
                raise GrammarError(f"generated token {t} at {i} is not accepted by the grammar")
        return m


class Matcher:
    """One request's place in its grammar."""

    __slots__ = ("m", "_xgr")

    def __init__(self, compiled: Any) -> None:
        self._xgr = _xgr()
        self.m = self._xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return bool(self.m.accept_token(token))

    @property
    def done(self) -> bool:
        return bool(self.m.is_terminated())

    def fill(self, bitmask: Any, row: int) -> None:
        """Writes the allowed next tokens into row `row` of an xgrammar bitmask."""
        self.m.fill_next_token_bitmask(bitmask, row)

    def allowed(self, vocab_size: int) -> list[int]:
        """The token ids allowed next, in order."""
        import numpy as np

        bm = self._xgr.allocate_token_bitmask(1, vocab_size)
        self.m.fill_next_token_bitmask(bm)
        bits = np.unpackbits(bm.numpy().view(np.uint8), bitorder="little")[:vocab_size]
        return np.flatnonzero(bits).tolist()
