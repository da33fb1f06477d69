"""/openapi.json: served, and generated from the very types that validate requests."""

from __future__ import annotations

import httpx
import msgspec

from segue.api import openai as oai


def test_openapi_document_is_the_validating_types(agg2):
    doc = httpx.get(agg2.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/responses/{response_id}",
        "/v1/models",
        "/health",
    ):
        assert path in doc["paths"], path
    _, want = msgspec.json.schema_components(
        (oai.CompletionRequest, oai.ChatCompletionRequest),
        ref_template="#/components/schemas/{name}",
    )
    got = doc["components"]["schemas"]
    for name, schema in want.items():
        assert got[name] == schema, name
    comp = got["CompletionRequest"]
    assert set(comp["required"]) == {"model", "prompt"}
    # a constraint the document states is one the server enforces
    limit = next(a for a in comp["properties"]["max_tokens"]["anyOf"] if a["type"] == "integer")
    r = httpx.post(
        agg2.url + "/v1/completions",
        json={"model": "segue-mocker", "prompt": "hi", "max_tokens": limit["minimum"] - 1},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    ref = doc["paths"]["/v1/completions"]["post"]["responses"]["400"]
    assert ref["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert set(r.json()["error"]) >= set(got["Error"]["properties"]["error"]["required"])
