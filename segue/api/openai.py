"""OpenAI request types, their validation and error bodies (responses: frontend/render.py)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from segue.sampling import Constraint, ConstraintKind

NonNegInt = Annotated[int, Meta(ge=0)]
MAX_CHOICES = 128  # choices one request may ask for: prompts x n
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI
# Stop strings are matched against every text delta: bound their number and length.
StopString = Annotated[str, Meta(min_length=1, max_length=256)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=16)]


class StreamOptions(Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class CommonParams(Struct, kw_only=True):
    model: str
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as OpenAI
    user: str | None = None
    # Extensions (as in vLLM): run past EOS; return token ids; per-request deadline (s).
    ignore_eos: bool = False
    return_token_ids: bool = False
    timeout: Annotated[float, Meta(gt=0.0)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] | None = None  # vLLM
    logprobs: Any = None  # completions: top-k count; chat: a bool (with top_logprobs)
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    # Structured outputs (both endpoints, as vLLM): OpenAI's and vLLM's own.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # Refused unless neutral (no engine here applies them), see `unsupported`.
    logit_bias: dict[str, float] | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None
    # accepted and ignored
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None


class CompletionRequest(CommonParams, kw_only=True):
    prompt: str | list[Any]
    echo: bool = False


class TextPart(Struct):
    type: str
    text: str = ""


class Message(Struct):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one


class ToolFunction(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Struct):
    type: str
    function: ToolFunction


class JsonSchemaFormat(Struct, kw_only=True):
    name: str = "response"
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormat(Struct):
    """OpenAI's: `text`, `json_object` or `json_schema` (what `chat.completions.parse`
    sends for a Pydantic model)."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Struct, kw_only=True):
    """vLLM's `structured_outputs`: exactly one of these constrains the output."""

    json: dict[str, Any] | str | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF), start rule `root`
    json_object: bool | None = None
    # vLLM's, refused here (see `unsupported`)
    structural_tag: str | None = None
    whitespace_pattern: str | None = None


class ChatCompletionRequest(CommonParams, kw_only=True):
    messages: list[Message]
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(Struct, kw_only=True):
    """vLLM's /tokenize: a prompt, or messages through the chat template."""

    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Struct, kw_only=True):
    model: str
    tokens: Annotated[list[TokenId], Meta(max_length=1_000_000)]


completion_decoder = msgspec.json.Decoder(CompletionRequest)
tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)
chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)


class APIError(Exception):
    """A client-visible error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}  # e.g. Retry-After on a 429 or 503
        self.message = message
        self.param = param
        self.code = code
        self.type = err_type or (
            "invalid_request_error" if status < 500 else "service_unavailable_error"
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code or self.status,
            }
        }


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def validation_error(e: msgspec.ValidationError | msgspec.DecodeError) -> APIError:
    """msgspec says 'Expected `int`, got `str` - at `$.max_tokens`': name the field."""
    msg = str(e)
    if isinstance(e, msgspec.ValidationError):
        m = _PATH_RE.search(msg)
        param = m.group(1) if m else None
        if "Object missing required field" in msg:
            param = msg.rsplit("`", 2)[-2] if "`" in msg else param
        return APIError(400, f"Invalid request: {msg}", param=param or None)
    return APIError(400, f"Request body is not valid JSON: {msg}", code="invalid_json")


def _is_ids(p: Any) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def prompt_list(prompt: str | list[Any]) -> list[str | list[int]]:
    """The prompts of a completion request: a string, a list of token ids, or a batch (a
    list of strings or of token-id lists), as OpenAI accepts them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and _is_ids(prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) or (_is_ids(p) and p) for p in prompt):
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} prompts in one request", param="prompt")
        return list(prompt)
    raise APIError(
        400,
        "prompt must be a string, a non-empty list of token ids, or a list of strings or of "
        "non-empty token-id lists",
        param="prompt",
    )


def message_dicts(messages: list[Message]) -> list[dict]:
    if not messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(
                400, f"messages[{i}].role {m.role!r} is not supported", param=f"messages[{i}].role"
            )
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise APIError(
                    400, "only text content parts are supported", param=f"messages[{i}].content"
                )
            content = "".join(p.text for p in content)
        d: dict[str, Any] = {"role": m.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(m, key) is not None:  # for templates that render tool conversations
                d[key] = getattr(m, key)
        out.append(d)
    return out


def constraint(body: CommonParams) -> tuple[Constraint | None, str]:
    """The request's output constraint and the field that set it (for errors): from
    `response_format` or `structured_outputs`, at most one of them, one kind each."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and so is not None:
        raise APIError(
            400, "give response_format or structured_outputs, not both", "structured_outputs"
        )
    if fmt is not None:
        if fmt.type == "text":
            return None, "response_format"
        if fmt.type == "json_object":
            return Constraint(ConstraintKind.JSON_OBJECT), "response_format"
        if fmt.type == "json_schema":
            js = fmt.json_schema
            if js is None or js.schema is None:
                raise APIError(
                    400, "response_format json_schema needs json_schema.schema", "response_format"
                )
            return Constraint(ConstraintKind.JSON_SCHEMA, _json_text(js.schema)), "response_format"
        raise APIError(
            400,
            f"response_format.type {fmt.type!r} must be text, json_object or json_schema",
            "response_format",
        )
    if so is None:
        return None, ""
    given = [
        (kind, value)
        for kind, value in (
            (ConstraintKind.JSON_SCHEMA, so.json),
            (ConstraintKind.REGEX, so.regex),
            (ConstraintKind.CHOICE, so.choice),
            (ConstraintKind.GRAMMAR, so.grammar),
            (ConstraintKind.JSON_OBJECT, so.json_object or None),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise APIError(
            400,
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
            "structured_outputs",
        )
    kind, value = given[0]
    if kind is ConstraintKind.JSON_SCHEMA:
        spec = value if isinstance(value, str) else _json_text(value)
    elif kind is ConstraintKind.CHOICE:
        spec = msgspec.json.encode(value).decode()
    elif kind is ConstraintKind.JSON_OBJECT:
        spec = ""
    else:
        spec = str(value)
    return Constraint(kind, spec), "structured_outputs"


def forced_tools(body: ChatCompletionRequest) -> list[Tool] | None:
    """The tools one of which the answer must call (`tool_choice` `required`, or a named
    function: that one); None when the model chooses (`auto`, `none`, unset)."""
    choice = body.tool_choice
    if choice in (None, "none", "auto"):
        return None
    tools = body.tools or []
    if not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if choice == "required":
        return tools
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise APIError(
            400,
            "tool_choice must be none, auto, required or "
            '{"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    named = [t for t in tools if t.function.name == name]
    if not named:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return named


def _json_text(value: Any) -> str:
    return msgspec.json.encode(value).decode()  # key order kept: it orders the output


def unsupported(body: CommonParams) -> APIError | None:
    """A 400 naming the first field set to something no engine here honours; None if the
    request asks nothing of that kind."""
    neutral: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("best_of", body.best_of, (None, body.n)),
    ]
    for name, value, ok in neutral:
        if value not in ok:
            return APIError(400, f"{name} is not supported by segue's engines yet", param=name)
    if body.logit_bias:
        return APIError(400, "logit_bias is not supported by segue's engines yet", "logit_bias")
    so = body.structured_outputs
    if so is not None:
        for name in ("structural_tag", "whitespace_pattern"):
            if getattr(so, name) is not None:
                return APIError(
                    400,
                    f"structured_outputs.{name} is not supported",
                    param=f"structured_outputs.{name}",
                )
    if isinstance(body, ChatCompletionRequest):
        for i, t in enumerate(body.tools or []):
            if t.type != "function":
                return APIError(
                    400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type"
                )
        try:
            forced_tools(body)
        except APIError as e:
            return e
    return None
