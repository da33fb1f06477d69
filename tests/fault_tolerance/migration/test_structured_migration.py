"""A constrained request survives its worker: the worker that continues advances its
grammar over the tokens already generated, so the client's output is token-identical to an
uninterrupted run and valid, whether the worker dies at the first token, in the middle of
the object, inside a string or one token before the end, or drains and hands it back.
Dynamo gives up here (it never migrates a guided request)."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from client import StreamReader, body, complete
from faults import metric, migrations, move_while_stopped, total_migrations, worker_of
from harness import Deployment, wait_until

from segue.protocol import EngineRequest, Error, FrameParser, KeepAlive, encode_request
from segue.sampling import Constraint, ConstraintKind, SamplingParams
from segue.tokenizer import BuiltinTokenizer

pytest.importorskip("xgrammar")

PROMPT = "the station report"
TOK = BuiltinTokenizer()  # the mocker's
SCHEMA = {
    "type": "object",
    "properties": {
        "station": {"type": "string", "maxLength": 16},
        "depth": {"type": "integer"},
        "readings": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
    },
    "required": ["station", "depth", "readings"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}}


def constrained(stream: bool, kind: str = "chat") -> dict:
    return body(kind, PROMPT, 400, stream, response_format=FORMAT, temperature=0.6, seed=21)


def run(d, b: dict, rid: str):
    if b["stream"]:
        return StreamReader(d.url, "chat", b, rid).finish()
    return complete(d.url, "chat", b, rid)


def crash_points(d) -> tuple[object, dict[str, int]]:
    want = complete(d.url, "chat", constrained(False))
    assert want.status == 200 and want.finish_reason == "stop", want.error
    doc = json.loads(want.text)
    assert set(doc) == {"station", "depth", "readings"}
    ids = want.token_ids
    # the first token after the opening quote of the station's value: inside a string
    inside = next(k for k in range(1, len(ids)) if TOK.decode(ids[:k]).count('"') == 3) + 1
    return want, {"first": 1, "middle": len(ids) // 2, "string": inside, "before_end": len(ids) - 1}


@pytest.mark.parametrize("point", ["first", "middle", "string", "before_end"])
@pytest.mark.parametrize("stream", [False, True])
def test_constrained_output_is_exact_across_a_crash(deploy, point, stream):
    deploy.start_frontend()
    healthy = deploy.start_worker()
    want, points = crash_points(deploy)
    faulty = deploy.start_worker("--fault-exit-after-tokens", str(points[point]))
    for i in range(2):  # round-robin: one of two consecutive requests lands on `faulty`
        rid = f"so-{point}-{stream}-{i}"
        got = run(deploy, constrained(stream), rid)
        assert got.status == 200 and got.error is None, got.error
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == "stop" and json.loads(got.text) == json.loads(want.text)
        if f"New Request ID: {rid}" in faulty.log():
            break
    else:
        raise AssertionError("no request reached the faulty worker")
    faulty.popen.wait(5)
    assert total_migrations(deploy) == 1
    assert f"New Request ID: {rid}" in healthy.log()


def test_constrained_request_is_handed_back_exactly_on_drain(deploy):
    deploy.start_frontend()
    # 50 ms a token: the answer (about 40 tokens) outlasts the 0.3 s drain by far
    slow = ("--mocker-step-ms", "50", "--mocker-batch-slowdown", "0", "--drain-timeout", "0.3")
    deploy.start_worker(*slow)
    want, _ = crash_points(deploy)
    deploy.start_worker(*slow)
    reader = StreamReader(deploy.url, "chat", constrained(True), "so-drain")
    reader.read_tokens(3)  # under way: then its worker drains and hands it back, live
    worker_of(deploy, "so-drain").signal(signal.SIGTERM)
    got = reader.finish()
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert json.loads(got.text) == json.loads(want.text)
    assert total_migrations(deploy) == 1


def test_constrained_request_of_a_hung_worker_goes_on_exactly(deploy):
    """SIGSTOP mid-answer: the stall timer moves it; the new worker's matcher is advanced
    over what the client already has. The hung worker's stream is still open when the
    timer fires (about 40 tokens at 100 ms each outlast reading 3 and the 1 s timer)."""
    deploy.start_frontend("--stall-timeout", "1")
    slow = ("--mocker-step-ms", "100", "--mocker-batch-slowdown", "0")
    deploy.start_worker(*slow)
    want, _ = crash_points(deploy)
    deploy.start_worker(*slow)
    reader = StreamReader(deploy.url, "chat", constrained(True), "so-stall")
    reader.read_tokens(3)
    victim = worker_of(deploy, "so-stall")
    victim.signal(signal.SIGSTOP)
    try:
        got = reader.finish()
        assert got.token_ids == want.token_ids and got.finish_reason == "stop"
        assert json.loads(got.text) == json.loads(want.text)
        assert migrations(deploy, "stall") == 1 and total_migrations(deploy) == 1
    finally:
        victim.signal(signal.SIGCONT)


def test_constrained_request_moved_live_with_its_kv_goes_on_exactly(deploy):
    """`/admin/move` mid-answer: the target pulls the KV, recomputes nothing, and continues
    the grammar from where the source left it."""
    deploy.start_frontend()
    slow = ("--mocker-step-ms", "50", "--mocker-batch-slowdown", "0")
    deploy.start_worker(*slow)
    want, _ = crash_points(deploy)
    deploy.start_worker(*slow)
    reader = StreamReader(deploy.url, "chat", constrained(True), "so-move")
    reader.read_tokens(3)
    source = worker_of(deploy, "so-move")
    target = next(w for w in deploy.workers if w is not source)
    computed = 'segue_engine_prompt_tokens_total{source="computed"}'
    before = metric(target, computed)
    assert move_while_stopped(source, "so-move") == ["so-move"]
    got = reader.finish()
    assert got.token_ids == want.token_ids and got.finish_reason == "stop"
    assert json.loads(got.text) == json.loads(want.text)
    assert "Handed back Request ID: so-move (live" in source.log()
    assert "New Request ID: so-move" in target.log()
    assert metric(target, computed) == before  # continued from the pulled KV
    assert migrations(deploy, "drain") == 1


def test_a_forged_context_is_an_error_naming_the_request(deploy):
    """A worker asked to continue from tokens its grammar does not accept refuses (400),
    never answering something else."""
    deploy.start_frontend()
    w = deploy.start_worker()
    tok = TOK
    sp = SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    forged = tok.encode(PROMPT) + tok.encode('["not an object"')
    req = EngineRequest(
        request_id="forged-1", token_ids=forged, max_tokens=5, start_offset=4, sampling=sp
    )
    r = httpx.post(w.url + "/generate", content=encode_request(req), timeout=10)
    # keep-alives while its grammar compiled, then the error
    (frame,) = [f for f in FrameParser().feed(r.content) if not isinstance(f, KeepAlive)]
    assert isinstance(frame, Error) and frame.code == "bad_request" and not frame.retryable
    assert "request forged-1: generated token" in frame.message


@pytest.mark.parametrize("strategy", ["frontend", "decode-first", "prefill-first"])
def test_constrained_request_across_a_disaggregated_hand_over(deploy, tmp_path, strategy):
    """The prefill worker builds no matcher (it makes no token); the decode worker's starts
    at the root, or, after its predecessor died mid-object (frontend, decode-first), is
    advanced over what the client already has: the answer equals an aggregated run's."""
    (tmp_path / "aggregated").mkdir()
    ref = Deployment(tmp_path / "aggregated")
    try:
        ref.start_frontend()
        ref.start_worker()
        want, points = crash_points(ref)
    finally:
        ref.stop()
    deploy.start_frontend("--disagg-strategy", strategy)
    deploy.start_worker(role="prefill")
    deploy.start_worker(role="decode")
    faulty = None
    if strategy != "prefill-first":
        faulty = deploy.start_worker(
            "--fault-exit-after-tokens", str(points["middle"]), role="decode"
        )
    for w in deploy.workers:  # workers that call peers must have seen them
        wait_until(lambda w=w: w.log().count("joined (") >= len(deploy.workers) - 1, what="peers")
    for i in range(2 if faulty else 1):  # round-robin: one of two lands on the faulty worker
        rid = f"so-disagg-{strategy}-{i}"
        got = run(deploy, constrained(i % 2 == 1), rid)
        assert got.status == 200 and got.error is None, got.error
        assert got.token_ids == want.token_ids and got.text == want.text
        if faulty is not None and f"New Request ID: {rid}" in faulty.log():
            break
    if faulty is not None:
        assert f"New Request ID: {rid}" in faulty.log(), "no request reached the faulty worker"
        faulty.popen.wait(5)
        assert total_migrations(deploy) == 1
