"""OpenTelemetry traces (`--otlp-traces-endpoint`) from real frontend and worker processes
to a real OTLP/HTTP receiver: the client's W3C traceparent is continued; a request whose
worker was SIGKILLed has one trace with two attempts, the first failed with the reason
and a migration event; a disaggregated request's prefill and decode calls (and the KV
transfer, with its bytes) are in its trace; a cancelled request's spans end with the
cancellation."""

from __future__ import annotations

import signal

import pytest
from client import StreamReader, body
from faults import worker_of
from harness import wait_until
from otlp_receiver import Receiver

pytest.importorskip("opentelemetry.sdk")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
FAST = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # export batches every 0.1 s, not 5 s


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def worker_id(proc) -> str:
    """A worker's id, from its ready line."""
    line = next(x for x in proc.log().splitlines() if "segue worker ready id=" in x)
    return line.split("id=", 1)[1].split()[0]


def request_span(receiver: Receiver, rid: str) -> dict:
    def found() -> list[dict]:
        spans = receiver.find(name="segue.request")
        return [x for x in spans if x["attributes"].get("gen_ai.request.id") == rid]

    (span,) = wait_until(found, 30, what=f"the request span of {rid}")
    return span


def calls_in(receiver: Receiver, trace_id: str) -> list[dict]:
    return [x for x in receiver.find(name="segue.worker.call") if x["trace_id"] == trace_id]


def children(receiver: Receiver, span: dict, name: str) -> list[dict]:
    return [s for s in receiver.find(name=name) if s["parent"] == span["span_id"]]


def test_a_killed_workers_request_is_one_trace_with_two_attempts(deploy, receiver):
    traced = ("--otlp-traces-endpoint", receiver.url)
    deploy.start_frontend(*traced, env=FAST)
    for _ in range(2):
        deploy.start_worker(*traced, "--mocker-step-ms", "5", env=FAST)
    rid = "trace-kill-1"
    s = StreamReader(
        deploy.url, "completions", body("completions", "the sea", 2000, True), rid,
        headers={"traceparent": TRACEPARENT},
    )  # fmt: skip
    s.read_tokens(5)
    victim = worker_of(deploy, rid)
    victim.signal(signal.SIGSTOP)  # mid-answer, whatever the pace of this process
    victim.signal(signal.SIGKILL)
    got = s.finish()
    assert got.error is None and len(got.token_ids) == 2000
    req = request_span(receiver, rid)
    assert (req["trace_id"], req["parent"]) == (TRACE, PARENT)  # the client's context
    assert req["attributes"]["gen_ai.usage.completion_tokens"] == 2000
    assert req["attributes"]["segue.migrations"] == 1
    migrations = [e for e in req["events"] if e[0] == "migration"]
    assert [e[1]["reason"] for e in migrations] == ["stream_broken"]
    assert migrations[0][1]["segue.worker.id"] == worker_id(victim)
    attempts = wait_until(
        lambda: (
            len(children(receiver, req, "segue.attempt")) == 2
            and children(receiver, req, "segue.attempt")
        ),
        30,
        what="both attempts",
    )
    first, second = sorted(attempts, key=lambda a: a["error"], reverse=True)
    assert (
        first["error"] and first["attributes"]["segue.attempt.outcome"] == "failed: stream_broken"
    )
    assert first["attributes"]["segue.worker.id"] == worker_id(victim)
    assert second["attributes"]["segue.attempt.outcome"] == "finished: length"
    survivor = next(w for w in deploy.workers if w is not victim)
    assert second["attributes"]["segue.worker.id"] == worker_id(survivor)
    (call,) = wait_until(
        lambda: children(receiver, second, "segue.worker.call"), 30, what="the survivor's span"
    )
    assert call["service"] == "segue-worker" and call["trace_id"] == TRACE
    assert call["attributes"]["segue.worker.id"] == worker_id(survivor)
    assert [e[0] for e in call["events"]][:1] == ["first_token"]


def test_a_cancelled_requests_spans_end_with_the_cancellation(deploy, receiver):
    traced = ("--otlp-traces-endpoint", receiver.url)
    deploy.start_frontend(*traced, env=FAST)
    w = deploy.start_worker(*traced, "--mocker-step-ms", "5", env=FAST)
    rid = "trace-cancel-1"
    s = StreamReader(deploy.url, "chat", body("chat", "the sea", 2000, True), rid)
    s.read_tokens(3)
    s.close()
    w.wait_log(f"Aborted Request ID: {rid}")
    req = request_span(receiver, rid)
    assert req["error"] and req["attributes"]["http.response.status_code"] == 499
    assert ("cancelled", {"reason": "the client went away"}) in req["events"]
    (attempt,) = wait_until(lambda: children(receiver, req, "segue.attempt"), 30, what="attempt")
    assert attempt["attributes"]["segue.attempt.outcome"] == "closed"
    (call,) = wait_until(lambda: children(receiver, attempt, "segue.worker.call"), 30, what="call")
    assert call["error"] and ("cancelled", {"reason": "the caller left"}) in call["events"]


@pytest.mark.parametrize("strategy", ["decode-first", "prefill-first", "frontend"])
def test_a_disaggregated_requests_prefill_and_decode_are_in_its_trace(deploy, receiver, strategy):
    traced = ("--otlp-traces-endpoint", receiver.url)
    deploy.start_frontend("--disagg-strategy", strategy, *traced, env=FAST)
    p = deploy.start_worker(*traced, role="prefill", env=FAST)
    d = deploy.start_worker(*traced, role="decode", env=FAST)
    for w in (p, d):
        wait_until(lambda w=w: w.log().count("joined (") >= 1, what=f"{w.name} sees its peer")
    rid = f"trace-disagg-{strategy}"
    got = StreamReader(deploy.url, "completions", body("completions", "the sea", 16, True), rid)
    assert got.finish().error is None
    req = request_span(receiver, rid)
    calls = wait_until(
        lambda: (
            len(calls_in(receiver, req["trace_id"])) == 2 and calls_in(receiver, req["trace_id"])
        ),
        30,
        what="the prefill and the decode call in the trace",
    )
    by_role = {c["attributes"]["segue.worker.role"]: c for c in calls}
    assert set(by_role) == {"prefill", "decode"}
    assert by_role["prefill"]["attributes"]["segue.worker.id"] == worker_id(p)
    assert by_role["decode"]["attributes"]["segue.worker.id"] == worker_id(d)
    spans = {s["span_id"]: s for s in receiver.find() if s["trace_id"] == req["trace_id"]}
    for c in calls:  # each hangs under the request, through attempts or the other stage
        up = c
        while up["span_id"] != req["span_id"]:
            up = spans[up["parent"]]
    pulled = [e for e in by_role["decode"]["events"] if e[0] == "kv_transfer"]
    if strategy != "prefill-first":  # there the prefill worker calls the decode with its KV
        assert len(pulled) == 1 and pulled[0][1]["segue.kv.bytes"] > 0
