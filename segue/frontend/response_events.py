"""One response of the Responses API as OpenAI streams it: the response object and its
events (`response.created`, `response.in_progress`, output items with their content parts
and text deltas, function calls with their argument deltas, then `response.completed`,
`response.incomplete` or `response.failed`), each with its `sequence_number`.

Every event is a function of the response's request and of its tokens, whatever frames they
arrived in: tokens are detokenized one at a time (so where a text delta ends does not
depend on how the worker grouped tokens into frames), item ids and call ids are derived
from the response id, and the tool-call parser's state is a function of the text. A
frontend that takes over a response replays its stored tokens through a fresh builder,
which makes the stored events again, number for number, and goes on from there: a client
resuming after event N gets exactly what an uninterrupted stream would have sent after N.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from segue.frontend.output import IncrementalDetokenizer
from segue.frontend.response_store import Status
from segue.frontend.tool_calls import ParsedCall, ToolCallParser
from segue.protocol import FinishReason
from segue.tokenizer import Tokenizer

_encode = msgspec.json.encode
_DELTA = "response.output_text.delta"
_DELTA_HEAD = b'{"type":"response.output_text.delta","sequence_number":'
_DELTA_TAIL = b',"logprobs":[]}'


def _tag(response_id: str, what: str) -> str:
    return hashlib.blake2b(f"{response_id}/{what}".encode(), digest_size=12).hexdigest()


def sse(event: bytes, kind: str) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + event + b"\n\n"


class ResponseEvents:
    """Builds one response's object and events; `emitted` holds the events (encoded) made
    since it was last emptied."""

    def __init__(
        self,
        response_id: str,
        header: dict[str, Any],
        created_at: int,
        tokenizer: Tokenizer,
        parser: ToolCallParser | None,
    ) -> None:
        self.id = response_id
        self.tokens: list[int] = []  # the output so far
        self.detok = IncrementalDetokenizer(tokenizer)  # of the output, one token at a time
        self._parser = parser
        self.header = header  # the request's fields that the response object echoes
        self.created_at = created_at
        self.status = Status.QUEUED if header.get("background") else Status.IN_PROGRESS
        self.output: list[dict[str, Any]] = []
        self.seq = -1
        self.emitted: list[tuple[int, str, bytes]] = []  # (sequence number, type, JSON)
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self._message: dict[str, Any] | None = None  # the open message item
        self._delta_ids = b""  # its ids in a delta event's JSON
        self._text: list[str] = []

    # -- the response object -------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status.value,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "output": self.output,
            "usage": self.usage,
            **self.header,
        }

    def encoded(self) -> bytes:
        return _encode(self.response())

    # -- events --------------------------------------------------------------------------

    def _emit(self, kind: str, **payload: Any) -> None:
        self.seq += 1
        self.emitted.append(
            (self.seq, kind, _encode({"type": kind, "sequence_number": self.seq, **payload}))
        )

    def start(self) -> None:
        self._emit("response.created", response=self.response())
        self.status = Status.IN_PROGRESS
        self._emit("response.in_progress", response=self.response())

    def add(self, token_ids: list[int], text: str) -> None:
        """New output tokens and their text (from `detok`, fed one token at a time)."""
        self.tokens += token_ids
        self._feed(text)

    def replay(self, token_ids: list[int]) -> None:
        """Output tokens already made (stored by an earlier owner), one at a time."""
        for t in token_ids:
            self.add([t], self.detok.add([t]))

    def _feed(self, text: str, last: bool = False) -> None:
        if self._parser is None:
            self.text(text)
            return
        content, calls = self._parser.feed(text)
        if last:
            rest, more = self._parser.finish()
            content, calls = content + rest, calls + more
        self.text(content)
        self.calls(calls)

    def text(self, delta: str) -> None:
        if not delta:
            return
        if self._message is None:
            index = len(self.output)
            item = {
                "id": "msg_" + _tag(self.id, f"item{index}"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self.output.append(item)
            self._message = item
            self._delta_ids = b'%s,"content_index":0,"delta":' % _encode(
                {"item_id": item["id"], "output_index": index}
            )[:-1].replace(b"{", b",", 1)
            self._emit("response.output_item.added", output_index=index, item=item)
            part = {"type": "output_text", "text": "", "annotations": []}
            self._emit(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        self._text.append(delta)
        # the event of every token: its JSON from a prefix made once per item (the bytes
        # _emit would make, in the same key order)
        self.seq += 1
        data = b"".join(
            (_DELTA_HEAD, b"%d" % self.seq, self._delta_ids, _encode(delta), _DELTA_TAIL)
        )
        self.emitted.append((self.seq, _DELTA, data))

    def _close_message(self) -> None:
        item = self._message
        if item is None:
            return
        index = self.output.index(item)
        text = "".join(self._text)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        self._emit("response.output_text.done", **ids, text=text, logprobs=[])
        self._emit("response.content_part.done", **ids, part=part)
        item["content"] = [part]
        item["status"] = "completed"
        self._emit("response.output_item.done", output_index=index, item=item)
        self._message, self._text = None, []

    def calls(self, calls: list[ParsedCall]) -> None:
        for call in calls:
            self._close_message()
            index = len(self.output)
            item = {
                "id": "fc_" + _tag(self.id, f"item{index}"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
            }
            self.output.append(item)
            self._emit("response.output_item.added", output_index=index, item=dict(item))
            ids = {"item_id": item["id"], "output_index": index}
            self._emit("response.function_call_arguments.delta", **ids, delta=call.arguments)
            self._emit(
                "response.function_call_arguments.done",
                **ids,
                name=call.name,
                arguments=call.arguments,
            )
            item["arguments"] = call.arguments
            item["status"] = "completed"
            self._emit("response.output_item.done", output_index=index, item=item)

    def finish(self, reason: FinishReason, input_tokens: int, cached: int) -> None:
        self._feed("", last=True)
        self._close_message()
        output_tokens = len(self.tokens)
        self.usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": min(cached, input_tokens)},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }
        if reason is FinishReason.LENGTH:
            self.status = Status.INCOMPLETE
            self.incomplete = {"reason": "max_output_tokens"}
            self._emit("response.incomplete", response=self.response())
        else:
            self.status = Status.COMPLETED
            self._emit("response.completed", response=self.response())

    def fail(self, code: str, message: str) -> None:
        self._close_message()
        self.status = Status.FAILED
        self.error = {"code": code, "message": message}
        self._emit("response.failed", response=self.response())

    @property
    def done(self) -> bool:
        return not self.status.running

    def take(self) -> list[tuple[int, str, bytes]]:
        out, self.emitted = self.emitted, []
        return out


TERMINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))
