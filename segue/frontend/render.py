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
        state = self.prep.state
        return usage(self.prep.prompt_len, len(state.generated), state.cached_tokens)

    def response(self, text: str, finish: FinishReason | None) -> bytes:
        """The JSON body of a non-streamed answer."""
        ids = self.prep.state.generated if self._ids else UNSET
        choice: Choice
        if self.prep.chat:
            choice = ChatChoice(0, Message("assistant", text), None, finish, ids)
            obj = "chat.completion"
        else:
            choice = CompletionChoice(0, text, None, finish, ids)
            obj = "text_completion"
        return _encode(
            Response(
                self.prep.state.request_id, obj, self.created, self.model, [choice], self.usage()
            )
        )

    def chunk(
        self, text: str, ids: list[int], finish: FinishReason | None, role: bool = False
    ) -> bytes:
        """One SSE event of a stream."""
        tids = ids if self._ids else UNSET
        choice: Choice
        if self.prep.chat:
            delta = ChatDelta("assistant", text) if role else ChatDelta(content=text)
            choice = ChatChunkChoice(0, delta, None, finish, tids)
        else:
            choice = CompletionChoice(0, text, None, finish, tids)
        return sse(
            Response(
                self.prep.state.request_id,
                self.chunk_object,
                self.created,
                self.model,
                [choice],
                self._usage,
            )
        )

    def usage_chunk(self) -> bytes:
        """The last event of a stream with `include_usage`: no choices, the usage."""
        return sse(
            Response(
                self.prep.state.request_id,
                self.chunk_object,
                self.created,
                self.model,
                [],
                self.usage(),
            )
        )
