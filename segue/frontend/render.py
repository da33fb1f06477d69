"""Rendering: OpenAI response and chunk objects (typed, encoded by msgspec) and SSE framing.

Optional fields are `UNSET` and left out of the JSON: `token_ids` only when the request
asked for them (`return_token_ids`), a chunk's `usage` (as null) only with
`stream_options.include_usage`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec
from msgspec import UNSET, Struct, UnsetType

from segue.frontend.output import TextDelta
from segue.frontend.preprocess import PreparedRequest
from segue.frontend.tool_calls import ParsedCall
from segue.protocol import FinishReason, Logprob
from segue.tokenizer import Tokenizer

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
SSE_DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose KV the worker found in its prefix cache


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    return Usage(
        prompt_tokens,
        completion_tokens,
        prompt_tokens + completion_tokens,
        PromptTokensDetails(min(cached_tokens, prompt_tokens)),
    )


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the prompt's first token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct):
    content: list[TokenLogprob]
    refusal: None = None


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


class FunctionCall(Struct):
    name: str
    arguments: str  # JSON text


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class FunctionDelta(Struct):
    arguments: str = ""
    name: str | UnsetType = UNSET


class ToolCallDelta(Struct):
    index: int
    function: FunctionDelta
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class Message(Struct):
    role: str
    content: str | None
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ChatChoice(Struct):
    index: int
    message: Message
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str | None = ""
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


Choice = CompletionChoice | ChatChoice | ChatChunkChoice


class Response(Struct):
    """A whole answer, or one chunk of a stream (`object` tells which)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None | UnsetType = UNSET


def sse(obj: Struct | dict) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


@dataclass(slots=True)
class ChoiceOutput:
    """One choice of a whole (non-streamed) answer, collected from its text deltas."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0
    content: str | None = None  # set: the text once tool calls are parsed out of it
    tool_calls: list[ParsedCall] = field(default_factory=list)

    def add(self, d: TextDelta) -> None:
        self.parts.append(d.text)
        self.token_ids.extend(d.token_ids)
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        self.finish_reason = d.finish_reason
        self.cached_tokens = d.cached_tokens or self.cached_tokens

    @property
    def text(self) -> str:
        return "".join(self.parts) if self.content is None else self.content


class Renderer:
    """The response objects of one request, from what each choice produced (the text
    deltas it is given): it counts their tokens for `usage`."""

    __slots__ = (
        "prep",
        "model",
        "tok",
        "created",
        "chunk_object",
        "_ids",
        "_usage",
        "_chars",
        "_tokens",
        "_cached",
    )

    def __init__(self, prep: PreparedRequest, model: str, tok: Tokenizer) -> None:
        self.prep = prep
        self.model = model
        self.tok = tok
        n = len(prep.states)
        self._chars = [0] * n  # per choice: text_offset of its next token
        self._tokens = [0] * n  # per choice: tokens rendered
        self._cached = [0] * n  # per choice: prompt tokens its worker had cached
        self.created = int(time.time())
        self.chunk_object = "chat.completion.chunk" if prep.chat else "text_completion"
        self._ids = prep.return_token_ids
        self._usage: None | UnsetType = None if prep.include_usage else UNSET

    def usage(self) -> Usage:
        """Every prompt once (whatever n), every choice's tokens."""
        return usage(self.prep.prompt_len, sum(self._tokens), sum(self._cached))

    def response(self, outputs: list[ChoiceOutput]) -> bytes:
        """The JSON body of a non-streamed answer: `outputs[k]` is choice k's (its echo is
        put before its text here)."""
        choices: list[Choice] = []
        for k, out in enumerate(outputs):
            self._tokens[k], self._cached[k] = len(out.token_ids), out.cached_tokens
            ids = out.token_ids if self._ids else UNSET
            lps = self._logprobs(k, out.token_ids, out.logprobs, out.prompt_logprobs, 0)
            finish = out.finish_reason
            if self.prep.chat:
                assert not isinstance(lps, CompletionLogprobs)
                message = Message("assistant", out.text)
                if out.tool_calls:
                    message = Message(
                        "assistant",
                        out.text or None,
                        [ToolCall(c.id, FunctionCall(c.name, c.arguments)) for c in out.tool_calls],
                    )
                choices.append(ChatChoice(k, message, lps, finish, ids))
            else:
                assert not isinstance(lps, ChatLogprobs)
                text = self.prep.echo[k] + out.text if self.prep.echo else out.text
                choices.append(CompletionChoice(k, text, lps, finish, ids))
        obj = "chat.completion" if self.prep.chat else "text_completion"
        return _encode(
            Response(self.prep.request_id, obj, self.created, self.model, choices, self.usage())
        )

    def role_chunk(self, index: int) -> bytes:
        """A chat stream's first event for choice `index`: the assistant role, no text."""
        choice = ChatChunkChoice(
            index, ChatDelta("assistant", ""), None, None, [] if self._ids else UNSET
        )
        return self._chunk(choice)

    def chunk(self, index: int, text: str, d: TextDelta) -> bytes:
        """One SSE event of a stream: choice `index`'s delta `d`, `text` in place of its
        own (an echo put before it)."""
        ids = d.token_ids
        self._tokens[index] += len(ids)
        self._cached[index] = d.cached_tokens or self._cached[index]
        tids = ids if self._ids else UNSET
        lps = (
            self._logprobs(index, ids, d.logprobs or [], d.prompt_logprobs, d.start)
            if ids
            else None
        )
        choice: Choice
        if self.prep.chat:
            assert not isinstance(lps, CompletionLogprobs)
            choice = ChatChunkChoice(index, ChatDelta(content=text), lps, d.finish_reason, tids)
        else:
            assert not isinstance(lps, ChatLogprobs)
            choice = CompletionChoice(index, text, lps, d.finish_reason, tids)
        return self._chunk(choice)

    def tool_call_chunks(self, index: int, calls: list[ParsedCall]) -> bytes:
        """Each call as OpenAI streams one: its index, id and name, then its arguments."""
        out = b""
        for c in calls:
            head = ToolCallDelta(c.index, FunctionDelta("", c.name), c.id, "function")
            args = ToolCallDelta(c.index, FunctionDelta(c.arguments))
            for d in (head, args):
                choice = ChatChunkChoice(index, ChatDelta(content=None, tool_calls=[d]), None, None)
                out += self._chunk(choice)
        return out

    def finish_chunk(self, index: int, finish: FinishReason) -> bytes:
        return self._chunk(ChatChunkChoice(index, ChatDelta(content=None), None, finish))

    def _chunk(self, choice: Choice) -> bytes:
        u = self.usage() if self.prep.continuous_usage else self._usage
        return sse(
            Response(self.prep.request_id, self.chunk_object, self.created, self.model, [choice], u)
        )

    def _logprobs(
        self,
        k: int,
        ids: list[int],
        generated: list[Logprob],
        prompt_lps: list[Logprob | None] | None,
        start: int,
    ) -> CompletionLogprobs | ChatLogprobs | None:
        """Choice k's logprobs of its tokens `ids` (from position `start` of its output), in
        the endpoint's shape; `prompt_lps`, with the first tokens, for echo."""
        state = self.prep.states[k]
        if state.sampling.logprobs is None:
            return None
        piece = self._piece
        if self.prep.chat:
            return ChatLogprobs(
                [
                    TokenLogprob(
                        (s := piece(t)),
                        lp.logprob,
                        list(s.encode()),
                        [
                            TopLogprob((ts := piece(ti)), tl, list(ts.encode()))
                            for ti, tl in zip(lp.top_ids, lp.top_logprobs, strict=True)
                        ],
                    )
                    for t, lp in zip(ids, generated, strict=True)
                ]
            )
        lps: list[Logprob | None] = list(generated)
        if start == 0 and state.echo_logprobs and prompt_lps is not None:
            ids = state.prompt_ids + ids  # echo: the prompt's first
            lps = prompt_lps + lps
        tokens = [piece(t) for t in ids]
        offsets = []
        at = self._chars[k]
        for s in tokens:
            offsets.append(at)
            at += len(s)
        self._chars[k] = at
        return CompletionLogprobs(
            tokens,
            [None if lp is None else lp.logprob for lp in lps],
            [
                None
                if lp is None
                else {piece(ti): tl for ti, tl in zip(lp.top_ids, lp.top_logprobs, strict=True)}
                for lp in lps
            ],
            offsets,
        )

    def _piece(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def usage_chunk(self) -> bytes:
        """The last event of a stream with `include_usage`: no choices, the usage."""
        return sse(
            Response(
                self.prep.request_id,
                self.chunk_object,
                self.created,
                self.model,
                [],
                self.usage(),
            )
        )
