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


class Message(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: Message
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] | UnsetType = UNSET


class ChatDelta(Struct):
    role: str | UnsetType = UNSET
    content: str = ""


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


class Renderer:
    """The response objects of one request."""

    __slots__ = ("prep", "model", "tok", "created", "chunk_object", "_ids", "_usage", "_chars")

    def __init__(self, prep: PreparedRequest, model: str, tok: Tokenizer) -> None:
        self.prep = prep
        self.model = model
        self.tok = tok
        self._chars = [0] * len(prep.states)  # per choice: text_offset of its next token
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
            state = self.prep.states[k]
            ids = state.generated if self._ids else UNSET
            lps = self._logprobs(k, 0, len(state.generated))
            if self.prep.chat:
                assert not isinstance(lps, CompletionLogprobs)
                choices.append(ChatChoice(k, Message("assistant", text), lps, finish, ids))
            else:
                assert not isinstance(lps, ChatLogprobs)
                text = self.prep.echo[k] + text if self.prep.echo else text
                choices.append(CompletionChoice(k, text, lps, finish, ids))
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
        start: int = 0,
    ) -> bytes:
        """One SSE event of a stream, for choice `index`: `ids` are its tokens from
        position `start` of the choice's output."""
        tids = ids if self._ids else UNSET
        lps = self._logprobs(index, start, len(ids)) if ids else None
        choice: Choice
        if self.prep.chat:
            assert not isinstance(lps, CompletionLogprobs)
            delta = ChatDelta("assistant", text) if role else ChatDelta(content=text)
            choice = ChatChunkChoice(index, delta, lps, finish, tids)
        else:
            assert not isinstance(lps, ChatLogprobs)
            choice = CompletionChoice(index, text, lps, finish, tids)
        u = self.usage() if self.prep.continuous_usage else self._usage
        return sse(
            Response(self.prep.request_id, self.chunk_object, self.created, self.model, [choice], u)
        )

    def _logprobs(self, k: int, start: int, n: int) -> CompletionLogprobs | ChatLogprobs | None:
        """Choice k's logprobs of its tokens [start, start + n), in the endpoint's shape."""
        state = self.prep.states[k]
        if state.logprobs is None:
            return None
        piece = self._piece
        ids = state.generated[start : start + n]
        generated = state.token_logprobs[start : start + n]
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
        if start == 0 and state.echo_logprobs and state.prompt_logprobs is not None:
            ids = state.prompt_ids + ids  # echo: the prompt's first
            lps = state.prompt_logprobs + lps
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
