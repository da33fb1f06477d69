"""Property-based fuzzing of every endpoint against /openapi.json (schemathesis), valid and
invalid data, on a real frontend and two mocker workers: never a 5xx, every response as the
document says, the frontend healthy afterwards and every worker back to idle."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from harness import Deployment, get_json, scrape, wait_until
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks

from segue.frontend.openapi import openapi_document

EXAMPLES = 60  # per operation and mode: bounded so CI stays short

schema = schemathesis.openapi.from_dict(openapi_document())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=EXAMPLES,
    database="none",
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("fuzz"))
    d.start_frontend("--stall-timeout", "10")
    d.start_worker()
    d.start_worker()
    yield d
    try:
        assert get_json(d.url + "/health")["status"] == "ok"
        for w in d.workers:
            wait_until(lambda w=w: _idle(w.url), what=f"{w.name} back to idle")
    finally:
        d.stop()


def _idle(url: str) -> bool:
    m = scrape(url)
    return m["segue_engine_running_requests"] == 0 and m["segue_engine_kv_blocks_used"] == 0


@schema.parametrize()
@hypothesis.settings(
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    derandomize=True,  # the same cases every run: a failure in CI reproduces here
)
def test_fuzz_every_endpoint(case, fuzzed):
    if case.body is not None and isinstance(case.body, dict):
        case.body = {**case.body}
        for key in ("max_tokens", "max_output_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 64:
                case.body[key] = 64  # valid, but keep each generation short
    r = case.call(base_url=fuzzed.url, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:400])
    case.validate_response(
        r,
        checks=[
            checks.response_schema_conformance,
            checks.content_type_conformance,
            checks.status_code_conformance,
            checks.negative_data_rejection,
        ],
    )
