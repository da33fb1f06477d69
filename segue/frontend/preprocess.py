"""Preprocessing: an OpenAI request body -> the request states the rest of the frontend works
on (prompt token ids, `SamplingParams`, limits) and how to present the answer.

The frontend tokenizes here so that it always knows the token ids of the prompt and of every
generated token: that is what makes migration exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from segue.api import openai as oai
from segue.disagg import Strategy
from segue.frontend.config import FrontendConfig
from segue.frontend.request import RequestState
from segue.frontend.tool_calls import ToolParser
from segue.grammar import tool_call_spec
from segue.sampling import Constraint, ConstraintKind, SamplingParams
from segue.tokenizer import Tokenizer


@dataclass
class PreparedRequest:
    """A validated request: what to generate and how to present it. Each choice is a
    request of its own to the workers (it migrates on its own): prompt i's choice j is
    `states[i * n + j]`, the choice's index in the response."""

    request_id: str  # the client's; choice k's requests to workers are `{request_id}-{k}`
    states: list[RequestState]
    prompt_lens: list[int]  # per prompt: usage counts each prompt once, whatever n
    chat: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool  # usage so far in every chunk (vLLM's continuous_usage_stats)
    stops: list[str]
    return_token_ids: bool
    timeout: float | None
    echo: list[str] = field(default_factory=list)  # per choice: text before its output
    constraint_param: str = ""  # the field that constrains the output (for its errors)
    tool_parser: ToolParser | None = None  # tool calls are parsed out of the answer

    @property
    def state(self) -> RequestState:
        return self.states[0]

    @property
    def prompt_len(self) -> int:
        return sum(self.prompt_lens)

    @property
    def constraint(self) -> Constraint | None:
        return self.state.sampling.constraint


Body = oai.CompletionRequest | oai.ChatCompletionRequest
T = TypeVar("T")


def decode_body(raw: bytes, chat: bool) -> Body:
    """The typed request, or a 400 naming the field (or the encoding) that is wrong."""
    if chat:
        return decode_json(raw, oai.chat_decoder)
    return decode_json(raw, oai.completion_decoder)


def decode_json(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    try:
        return decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise oai.validation_error(e) from None
    except UnicodeDecodeError as e:  # msgspec's error for a string that is not UTF-8
        raise oai.APIError(
            400, f"Request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding"
        ) from None
    except RecursionError:  # `prompt` may hold lists: a million nested ones is not a prompt
        raise oai.APIError(400, "Request body is nested too deeply", code="invalid_json") from None


class Preprocessor:
    """Preprocessing for one served model (its tokenizer and chat template)."""

    def __init__(self, cfg: FrontendConfig, tokenizer: Tokenizer, model: str) -> None:
        self.cfg = cfg
        self.model = model
        self.tok = tokenizer

    def __call__(self, body: Body, chat: bool, request_id: str) -> PreparedRequest:
        """Raises `oai.APIError` (a 4xx naming the field) for anything it cannot serve."""
        if (err := oai.unsupported(body)) is not None:
            raise err
        constraint, constraint_param = oai.constraint(body)
        tool_parser, tool_call = None, None
        if isinstance(body, oai.ChatCompletionRequest) and body.tools:
            constraint, constraint_param, tool_parser, tool_call = self._tools(
                body, constraint, constraint_param
            )
        logprobs = self._logprobs(body)
        stop_ids = body.stop_token_ids or []
        if any(t >= self.tok.vocab_size for t in stop_ids):
            raise oai.APIError(400, "stop token id out of range", param="stop_token_ids")
        max_tokens: int | None
        echo: list[str] = []  # per prompt, with `echo`
        if isinstance(body, oai.ChatCompletionRequest):
            tools = [msgspec.to_builtins(t) for t in body.tools] if body.tools else None
            text = self.tok.apply_chat_template(oai.message_dicts(body.messages), tools)
            prompts: list[list[int]] = [self.tok.encode(text, add_special_tokens=False)]
            max_tokens = body.max_completion_tokens or body.max_tokens
            prompt_param = "messages"
        else:
            prompts = []
            for p in oai.prompt_list(body.prompt):
                if isinstance(p, list) and any(t < 0 or t >= self.tok.vocab_size for t in p):
                    raise oai.APIError(400, "prompt token id out of range", param="prompt")
                prompts.append(self.tok.encode(p) if isinstance(p, str) else p)
                if body.echo:
                    echo.append(p if isinstance(p, str) else self.tok.decode(p))
            max_tokens = body.max_tokens
            prompt_param = "prompt"
        if len(prompts) * body.n > oai.MAX_CHOICES:
            raise oai.APIError(400, f"prompts x n is at most {oai.MAX_CHOICES} choices", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        # A sampled request gets a fixed seed so that a migrated continuation samples the
        # same way the first worker would have; choice k samples with seed + k, so with a
        # seed each choice is reproducible.
        seed = body.seed if body.seed is not None else random.getrandbits(63)
        states: list[RequestState] = []
        single = len(prompts) * body.n == 1
        for ids in prompts:
            if not ids:
                raise oai.APIError(400, "the prompt is empty", param=prompt_param)
            budget = self._max_tokens(body, chat, len(ids), max_tokens, prompt_param)
            for _ in range(body.n):
                k = len(states)
                sampling = SamplingParams(
                    temperature=temperature,
                    top_p=body.top_p or 1.0,
                    seed=(seed + k + 2**63) % 2**64 - 2**63,  # stays an int64
                    stop_token_ids=stop_ids,
                    ignore_eos=body.ignore_eos,
                    logprobs=logprobs,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=body.repetition_penalty or 1.0,
                    min_tokens=min(body.min_tokens or 0, budget),
                    constraint=constraint,
                    tool_call=tool_call,
                )
                states.append(
                    RequestState(
                        request_id=request_id if single else f"{request_id}-{k}",
                        model=self.model,
                        prompt_ids=ids,
                        max_tokens=budget,
                        sampling=sampling,
                        echo_logprobs=bool(echo) and logprobs is not None,
                        eos_token_ids=self.tok.eos_token_ids,
                    )
                )
        return PreparedRequest(
            request_id=request_id,
            states=states,
            prompt_lens=[len(ids) for ids in prompts],
            chat=chat,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            continuous_usage=bool(
                body.stream_options and body.stream_options.continuous_usage_stats
            ),
            stops=stops,
            return_token_ids=body.return_token_ids,
            timeout=body.timeout or self.cfg.request_timeout,
            echo=[text for text in echo for _ in range(body.n)],
            constraint_param=constraint_param,
            tool_parser=tool_parser,
        )

    def _tools(
        self, body: oai.ChatCompletionRequest, constraint: Constraint | None, param: str
    ) -> tuple[Constraint | None, str, ToolParser | None, Constraint | None]:
        """With tools: the constraint (`required` or a named function: one call of those
        tools, in the parser's format), the parser (unless tool_choice is none), and what
        a call would follow (the mocker's --mocker-tool-calls)."""
        parser = self.cfg.tool_call_parser
        if body.tool_choice == "none":
            return constraint, param, None, None
        forced = oai.forced_tools(body)
        tools = forced or body.tools or []
        spec = tool_call_spec(parser, [(t.function.name, t.function.parameters) for t in tools])
        call = Constraint(ConstraintKind.TOOL_CALL, spec)
        if forced is None:
            return constraint, param, parser, call
        if constraint is not None:
            raise oai.APIError(
                400, f"tool_choice {body.tool_choice!r} cannot be combined with {param}", param
            )
        return call, "tool_choice", parser, None

    def _logprobs(self, body: Body) -> int | None:
        """How many top logprobs each token comes with (0: its own only), None: no
        logprobs. Completions: `logprobs` is that number; chat: `logprobs` true, and
        `top_logprobs` that number."""
        if isinstance(body, oai.ChatCompletionRequest):
            if body.logprobs not in (None, True, False):
                raise oai.APIError(400, "logprobs must be true or false", param="logprobs")
            if not body.logprobs:
                if body.top_logprobs:
                    raise oai.APIError(
                        400, "top_logprobs needs logprobs: true", param="top_logprobs"
                    )
                return None
            n = body.top_logprobs or 0
        else:
            if body.logprobs is None:
                return None
            if type(body.logprobs) is not int or not 0 <= body.logprobs <= oai.MAX_LOGPROBS:
                raise oai.APIError(
                    400, f"logprobs must be an integer 0-{oai.MAX_LOGPROBS}", param="logprobs"
                )
            n = body.logprobs
        echo = isinstance(body, oai.CompletionRequest) and body.echo
        if echo and self.cfg.disagg_strategy is not Strategy.NONE:
            # the decode side gets the prompt's KV, not its logits
            raise oai.APIError(
                400, "echo with logprobs is not supported with disaggregated serving", "echo"
            )
        return n

    def _max_tokens(
        self,
        body: oai.CommonParams,
        chat: bool,
        prompt_len: int,
        asked: int | None,
        prompt_param: str,
    ) -> int:
        ctx = self.tok.context_length
        if prompt_len >= ctx:
            raise oai.APIError(
                400,
                f"the prompt has {prompt_len} tokens; this model's context length is {ctx}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        if asked is None:
            default = (
                self.cfg.default_max_tokens_chat if chat else self.cfg.default_max_tokens_completion
            )
            return min(default, room)
        if asked > room:
            param = (
                "max_completion_tokens"
                if isinstance(body, oai.ChatCompletionRequest) and body.max_completion_tokens
                else "max_tokens"
            )
            raise oai.APIError(
                400,
                f"{param}={asked} plus the prompt's {prompt_len} tokens exceeds "
                f"the context length {ctx}",
                param=param,
                code="context_length_exceeded",
            )
        return asked
