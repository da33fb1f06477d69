"""The OpenAPI document served at /openapi.json, generated from the msgspec types that
validate requests (api/openai.py), so the description cannot drift from the validation."""

from __future__ import annotations

from typing import Any

import msgspec

from segue.api import openai as oai
from segue.api import responses as rapi

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}


def _errors(*codes: int) -> dict[str, Any]:
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {str(c): {"description": "an OpenAI-style error", **ref} for c in codes}


def _post(name: str, summary: str, ok: dict[str, Any], errors: tuple[int, ...]) -> dict[str, Any]:
    """A POST whose JSON body is the schema `name`, answering `ok` (a 200) or errors."""
    body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": body},
            "responses": {"200": ok, **_errors(*errors)},
        }
    }


def _generation(name: str, summary: str) -> dict[str, Any]:
    ok = {
        "description": "the answer (JSON), or a stream of SSE chunks when `stream` is true",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return _post(name, summary, ok, (400, 404, 408, 413, 503))


def _tokenizer(name: str, summary: str) -> dict[str, Any]:
    ok = {"description": summary, "content": {"application/json": {"schema": {"type": "object"}}}}
    return _post(name, summary, ok, (400, 404, 408, 413))


def _get(summary: str, media: str = "application/json") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {
                    "description": summary,
                    "content": {
                        media: {
                            "schema": {
                                "type": "object" if media == "application/json" else "string"
                            }
                        }
                    },
                },
                **(
                    {"503": {"description": "no worker can take requests"}}
                    if summary.startswith("Health")
                    else {}
                ),
            },
        }
    }


_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
_JSON_OK = {
    "description": "the response object",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _stored(method: str, summary: str, errors: tuple[int, ...]) -> dict[str, Any]:
    """An operation on one stored response."""
    return {
        method: {
            "summary": summary,
            "parameters": [_RESPONSE_ID],
            "responses": {"200": _JSON_OK, **_errors(*errors)},
        }
    }


def _responses_paths() -> dict[str, Any]:
    stream_ok = {
        "description": "the response object, or its events after `starting_after` (SSE)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    query = [
        {"name": "stream", "in": "query", "schema": {"type": "boolean"}},
        {"name": "starting_after", "in": "query", "schema": {"type": "integer", "minimum": -1}},
    ]
    get = {
        "get": {
            "summary": "Retrieve a stored response, or stream its events again",
            "parameters": [_RESPONSE_ID, *query],
            "responses": {"200": stream_ok, **_errors(400, 404, 503)},
        }
    }
    return {
        "/v1/responses": _generation("ResponsesRequest", "Create a response"),
        "/v1/responses/{response_id}": {
            **get,
            **_stored("delete", "Delete a stored response", (404, 503)),
        },
        "/v1/responses/{response_id}/cancel": _stored(
            "post", "Cancel a background response", (400, 404, 503)
        ),
        "/v1/responses/{response_id}/input_items": _stored(
            "get", "The input items of a stored response", (404, 503)
        ),
    }


def openapi_document() -> dict[str, Any]:
    _, schemas = msgspec.json.schema_components(
        (
            oai.CompletionRequest,
            oai.ChatCompletionRequest,
            oai.TokenizeRequest,
            oai.DetokenizeRequest,
            rapi.ResponsesRequest,
        ),
        ref_template="#/components/schemas/{name}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "segue",
            "version": "1",
            "description": "OpenAI-compatible API of a segue frontend",
        },
        "paths": {
            "/v1/completions": _generation("CompletionRequest", "Create a completion"),
            "/v1/chat/completions": _generation(
                "ChatCompletionRequest", "Create a chat completion"
            ),
            "/v1/models": _get("List the served models"),
            "/tokenize": _tokenizer("TokenizeRequest", "Token ids of a prompt or of chat messages"),
            "/detokenize": _tokenizer("DetokenizeRequest", "Text of token ids"),
            "/health": _get("Health: the workers and whether one is routable"),
            "/live": _get("Liveness of the frontend process"),
            "/metrics": _get("Prometheus metrics", "text/plain"),
            **_responses_paths(),
        },
        "components": {"schemas": {**schemas, "Error": _ERROR}},
    }
