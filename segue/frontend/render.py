"""Rendering: OpenAI response and chunk objects (typed, encoded by msgspec) and SSE framing.

Optional fields are `UNSET` and left out of the JSON: `token_ids` only when the request
asked for them (`return_token_ids`), a chunk's `usage` (as null) only with
`stream_options.include_usage`.
"""

from __future__ import annotations

import time

import msgspec
from msgspec import UNSET, Struct, UnsetType

from segue.frontend.preprocess import PreparedRequest
from segue.protocol import FinishReason

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


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


class Message(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: Message
    logprobs: None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str = ""


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    logprobs: None
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


class Renderer:
    """The response objects of one request."""

    __slots__ = ("prep", "model", "created", "chunk_object", "_ids", "_usage")

    def __init__(self, prep: PreparedRequest, model: str) -> None:
        self.prep = prep
        self.model = model
        self.created = int(time.time())
        self.chunk_object = "chat.completion.chunk" if prep.chat else "text_completion"
        self._ids = prep.return_token_ids
        self._usage: None | UnsetType = None if prep.include_usage else UNSET

    def usage(self) -> Usage:
        """Every prompt once (whatever n), every choice's tokens."""
        states = self.prep.states
        return usage(
            self.prep.prompt_len,
            sum(len(s.generated) for s in states),
            sum(s.cached_tokens for s in states),
        )

    def response(self, results: list[tuple[str, FinishReason | None]]) -> bytes:
        """The JSON body of a non-streamed answer: `results[k]` is choice k's text (its echo
        put before it here) and finish reason."""
        choices: list[Choice] = []
        for k, (text, finish) in enumerate(results):
            ids = self.prep.states[k].generated if self._ids else UNSET
            if self.prep.chat:
                choices.append(ChatChoice(k, Message("assistant", text), None, finish, ids))
            else:
                text = self.prep.echo[k] + text if self.prep.echo else text
                choices.append(CompletionChoice(k, text, None, finish, ids))
        obj = "chat.completion" if self.prep.chat else "text_completion"
        return _encode(
            Response(self.prep.request_id, obj, self.created, self.model, choices, self.usage())
        )

    def chunk(
        self,
        index: int,
        text: str,
        ids: list[int],
        finish: FinishReason | None,
        role: bool = False,
    ) -> bytes:
        """One SSE event of a stream, for choice `index`."""
        tids = ids if self._ids else UNSET
        choice: Choice
        if self.prep.chat:
            delta = ChatDelta("assistant", text) if role else ChatDelta(content=text)
            choice = ChatChunkChoice(index, delta, None, finish, tids)
        else:
            choice = CompletionChoice(index, text, None, finish, tids)
        u = self.usage() if self.prep.continuous_usage else self._usage
        return sse(
            Response(self.prep.request_id, self.chunk_object, self.created, self.model, [choice], u)
        )

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
