"""Tool calls parsed out of a choice's text, as it streams (`--tool-call-parser`):

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, text
               around them is content (Qwen, Hermes, and segue's make-model template)
  llama3_json  the whole output one JSON object {"name": ..., "parameters": {...}} (or
               several separated by ";"), optionally after <|python_tag|>

The parser's state is a function of the text so far, so a migrated choice (whose text is
that of an uninterrupted run) streams the same tool-call deltas. Text that may start a call
is held back until it is known not to; a call goes out once it is whole, as OpenAI's
`delta.tool_calls` (its index, id and name, then its arguments). Call ids are derived from
the request id and the call's index: the same for the same request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum


class ToolParser(StrEnum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3_json"


@dataclass(frozen=True, slots=True)
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def _call(text: str, args_key: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call's JSON, or None if it is not one."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    args = doc.get(args_key, doc.get("arguments", {}))
    return doc["name"], json.dumps(args, ensure_ascii=False)


class ToolCallParser:
    """One choice's parser: `feed` each text delta, then `finish`."""

    def __init__(self, kind: ToolParser, call_id_prefix: str) -> None:
        self.kind = ToolParser(kind)
        self.prefix = call_id_prefix
        self.calls: list[ParsedCall] = []
        self._buf = ""  # held back: may be (part of) a call
        self._inside = False  # hermes: between <tool_call> and </tool_call>
        self._all = ""  # llama3_json: the whole text (a call is the whole output)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """The content to send now and the calls completed by `text`."""
        if self.kind is ToolParser.LLAMA3_JSON:
            self._all += text
            stripped = self._all.lstrip()
            if not stripped or stripped.startswith(("{", _PYTHON_TAG[: len(stripped)])):
                return "", []  # may be a call: decided at the end
            out, self._all = self._all, ""
            self.kind = ToolParser.HERMES  # plain text from here: nothing more to hold
            self._inside = False
            return out, []
        return self._hermes(text)

    def _hermes(self, text: str) -> tuple[str, list[ParsedCall]]:
        buf = self._buf + text
        content: list[str] = []
        done: list[ParsedCall] = []
        while buf:
            if self._inside:
                end = buf.find(_CLOSE)
                if end < 0:
                    break
                parsed = _call(buf[:end].strip(), "arguments")
                if parsed is None:  # not a call after all: it is content
                    content.append(_OPEN + buf[: end + len(_CLOSE)])
                else:
                    done.append(self._new(*parsed))
                buf = buf[end + len(_CLOSE) :]
                self._inside = False
                continue
            start = buf.find(_OPEN)
            if start >= 0:
                content.append(buf[:start])
                buf = buf[start + len(_OPEN) :]
                self._inside = True
                continue
            # hold back the longest tail that could begin <tool_call>
            longest = min(len(_OPEN) - 1, len(buf))
            keep = next((n for n in range(longest, 0, -1) if _OPEN.startswith(buf[-n:])), 0)
            content.append(buf[: len(buf) - keep])
            buf = buf[len(buf) - keep :]
            break
        self._buf = buf
        return "".join(content), done

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """At the end of the choice: what was held back, as calls or content."""
        if self.kind is ToolParser.LLAMA3_JSON:
            text, self._all = self._all, ""
            body = text.strip().removeprefix(_PYTHON_TAG).strip()
            parts = [p for p in body.split(";") if p.strip()] if body else []
            parsed = [_call(p.strip(), "parameters") for p in parts]
            if parts and all(p is not None for p in parsed):
                return "", [self._new(*p) for p in parsed if p is not None]
            return text, []
        rest = (_OPEN if self._inside else "") + self._buf
        self._buf, self._inside = "", False
        return rest, []

    def _new(self, name: str, arguments: str) -> ParsedCall:
        call = ParsedCall(len(self.calls), f"call_{self.prefix}_{len(self.calls)}", name, arguments)
        self.calls.append(call)
        return call
