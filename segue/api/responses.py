"""The Responses API's request (`POST /v1/responses`), as OpenAI defines it, and how it
becomes a chat completion request: the conversation (a previous response's, then this
input), the instructions as a system message, function tools, `text.format` as
`response_format`. A field segue does not serve is refused with a 400 naming it (the
struct forbids unknown fields); docs/api.md lists what is served.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from segue.api import openai as oai

ItemList = Annotated[list[dict[str, Any]], Meta(max_length=4096)]


class FunctionTool(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(Struct, kw_only=True, forbid_unknown_fields=True):
    type: str = "text"  # text, json_object, json_schema
    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted; the engines have no such knob


class ResponsesRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    input: str | ItemList
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    tools: Annotated[list[FunctionTool], Meta(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None
    user: str | None = None


decoder = msgspec.json.Decoder(ResponsesRequest)


def seed_of(response_id: str) -> int:
    """A sampled response's seed, a function of its id: whichever frontend (re)runs it
    draws the same tokens."""
    return int.from_bytes(hashlib.blake2b(response_id.encode(), digest_size=7).digest(), "big")


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's input as items (a string is one user message), each checked."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    if not body.input:
        raise oai.APIError(400, "input must not be empty", param="input")
    for i, item in enumerate(body.input):
        kind = item.get("type", "message")
        if kind not in ("message", "function_call", "function_call_output"):
            raise oai.APIError(
                400, f"input[{i}].type {kind!r} is not supported", param=f"input[{i}].type"
            )
        _message(item, f"input[{i}]")  # checks its fields
    return list(body.input)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                raise oai.APIError(
                    400, "only text content parts are supported", param=f"{where}.content[{j}]"
                )
            text = p.get("text")
            if not isinstance(text, str):
                raise oai.APIError(400, "a text part needs text", param=f"{where}.content[{j}]")
            parts.append(text)
        return "".join(parts)
    raise oai.APIError(400, "content must be a string or text parts", param=f"{where}.content")


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise oai.APIError(400, f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value


def _message(item: dict[str, Any], where: str) -> oai.Message:
    """One item as a chat message."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {
            "id": _string(item, "call_id", where),
            "type": "function",
            "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where),
            },
        }
        return oai.Message(role="assistant", content="", tool_calls=[call])
    if kind == "function_call_output":
        return oai.Message(
            role="tool",
            content=_string(item, "output", where),
            tool_call_id=_string(item, "call_id", where),
        )
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise oai.APIError(400, f"{where}.role {role!r} is not supported", param=f"{where}.role")
    return oai.Message(role=role, content=_text(item.get("content"), where))


def chat_request(
    body: ResponsesRequest, conversation: list[dict[str, Any]], response_id: str
) -> oai.ChatCompletionRequest:
    """The chat completion request that generates this response: instructions, the
    earlier conversation (items), then this input."""
    messages = [oai.Message(role="system", content=body.instructions)] if body.instructions else []
    messages += [_message(item, "input") for item in conversation]
    tools = None
    if body.tools is not None:
        tools = []
        for i, t in enumerate(body.tools):
            if t.type != "function":
                raise oai.APIError(
                    400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type"
                )
            fn = oai.ToolFunction(t.name, t.description, t.parameters, t.strict)
            tools.append(oai.Tool("function", fn))
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    fmt = None
    if body.text is not None and body.text.format is not None:
        f = body.text.format
        js = oai.JsonSchemaFormat(name=f.name, description=f.description, schema=f.schema,
                                  strict=f.strict) if f.type == "json_schema" else None  # fmt: skip
        fmt = oai.ResponseFormat(type=f.type, json_schema=js)
    return oai.ChatCompletionRequest(
        model=body.model,
        messages=messages,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=seed_of(response_id),
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=fmt,
        user=body.user,
    )
