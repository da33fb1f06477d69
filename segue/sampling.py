"""`SamplingParams`: how the next tokens of one request are chosen, in one struct.

The frontend's preprocessor builds it from the API body; the request plane carries it whole
(`EngineRequest.sampling`), and the engine reads it from `EngineInput.sampling`. A new
sampling option is a field here, the preprocessor line that sets it and the engines that
apply it; nothing in between copies fields.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec


class ConstraintKind(StrEnum):
    """What the output must match (segue.grammar compiles each with xgrammar)."""

    JSON_SCHEMA = "json_schema"  # `spec`: the schema, as JSON text
    JSON_OBJECT = "json_object"  # any JSON object (`spec` empty)
    REGEX = "regex"
    CHOICE = "choice"  # `spec`: a JSON list of the strings allowed
    GRAMMAR = "grammar"  # `spec`: EBNF (GBNF), `root` the start rule
    # `spec`: JSON {"format": a --tool-call-parser, "tools": [{"name", "parameters"}]}: one
    # call of one of the tools, in that parser's format, its arguments valid for its schema
    TOOL_CALL = "tool_call"


class Constraint(msgspec.Struct, frozen=True, array_like=True):
    """Constrained decoding: the output is a prefix of a string of the constraint's
    language, whole when it finishes with `stop`. A migrated request's engine advances the
    grammar over the tokens already generated before it samples."""

    kind: ConstraintKind
    spec: str = ""


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # A sampled request always carries a seed (the frontend draws one when the client gives
    # none): a migrated continuation then samples as the first worker would have.
    seed: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # with each token its logprob and this many top ones
    # Penalties see a migrated request's earlier output (the context's last `generated`
    # tokens) as generated ones, min_tokens counts them: a move changes nothing.
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's and transformers', over the whole context
    min_tokens: int = 0  # no EOS or stop token before this many generated tokens
    constraint: Constraint | None = None  # structured output
    # With tools and tool_choice auto, what a call would follow: the mocker's
    # --mocker-tool-calls answers with one; the real engines ignore it.
    tool_call: Constraint | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()
