"""Live moves with real processes: a request given back with the KV of its context (by the
admin call, or at a drain deadline) goes on on another worker without recomputing, with
exactly the tokens of an uninterrupted run; a KV that cannot be pulled falls back to
recompute; a cancelled move frees both workers; moving a request whose client left does
nothing."""

from __future__ import annotations

import signal

import httpx
import pytest
from client import StreamReader, body, complete
from faults import metric, migrations, move_while_stopped, worker_of
from harness import Proc, wait_until

PROMPT = " ".join(["the river runs to the sea"] * 8)  # a few full KV blocks
N = 200
SLOW = ["--mocker-step-ms", "10"]  # N tokens take 2 s: a move lands mid-stream
COMPUTED = 'segue_engine_prompt_tokens_total{source="computed"}'
PULLED = 'segue_engine_prompt_tokens_total{source="external_kv_transfer"}'
FALLBACKS = "segue_frontend_kv_move_fallbacks_total"


def golden(d, n: int = N):
    r = complete(d.url, "completions", body("completions", PROMPT, n, False))
    assert r.status == 200, r.error
    return r


def move(worker: Proc, rid: str) -> list[str]:
    r = httpx.post(worker.url + "/admin/move", json={"request_id": rid}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["moved"]


def stream_on(deploy, worker: Proc, prefix: str) -> tuple[str, StreamReader]:
    """A stream that started on `worker` (round-robin: one of two requests does)."""
    for i in range(2):
        rid = f"{prefix}-{i}"
        s = StreamReader(deploy.url, "completions", body("completions", PROMPT, N, True), rid)
        s.read_tokens(3)
        if worker_of(deploy, rid) is worker:
            return rid, s
        s.close()
    raise AssertionError(f"no request started on {worker.name}")


def idle(w: Proc) -> bool:
    m = w.metrics()
    return (
        m["segue_engine_running_requests"] == 0
        and m["segue_engine_kv_blocks_used"] == 0
        and m["segue_worker_kv_handles_held"] == 0
    )


@pytest.mark.parametrize("after", [1, N // 2])
def test_admin_move_goes_on_exactly_without_recompute(deploy, after):
    deploy.start_frontend()
    a = deploy.start_worker(*SLOW)
    b = deploy.start_worker(*SLOW)
    want = golden(deploy)
    rid = f"live-{after}"
    s = StreamReader(deploy.url, "completions", body("completions", PROMPT, N, True), rid)
    s.read_tokens(after)
    source = worker_of(deploy, rid)
    target = b if source is a else a
    computed, pulled = metric(target, COMPUTED), metric(target, PULLED)
    assert move_while_stopped(source, rid) == [rid]
    got = s.finish()
    assert got.token_ids == want.token_ids and got.text == want.text
    assert f"Handed back Request ID: {rid} (live" in source.log()
    assert f"New Request ID: {rid}" in target.log()
    assert metric(target, COMPUTED) == computed  # nothing recomputed on the target
    assert metric(target, PULLED) > pulled + len(want.token_ids) // 4
    assert migrations(deploy, "drain") == 1 and metric(deploy, FALLBACKS) == 0
    wait_until(lambda: idle(a) and idle(b), what="both workers idle")


def test_drain_deadline_moves_requests_live(deploy):
    deploy.start_frontend()
    victim = deploy.start_worker(*SLOW, "--drain-timeout", "0")
    want = golden(deploy)
    rid = "live-drain"
    s = StreamReader(deploy.url, "completions", body("completions", PROMPT, N, True), rid)
    s.read_tokens(5)  # on the victim: the only worker yet
    other = deploy.start_worker(*SLOW)
    computed = metric(other, COMPUTED)
    victim.signal(signal.SIGTERM)
    got = s.finish()
    assert got.token_ids == want.token_ids
    assert victim.popen.wait(30) == 0
    assert f"Handed back Request ID: {rid} (live" in victim.log()
    assert metric(other, COMPUTED) == computed and metric(deploy, FALLBACKS) == 0


def test_a_kv_that_cannot_be_pulled_falls_back_to_recompute(deploy):
    deploy.start_frontend()
    victim = deploy.start_worker(*SLOW, "--kv-ttl", "0.001")  # the handle expires at once
    other = deploy.start_worker(*SLOW)
    want = golden(deploy)
    rid, s = stream_on(deploy, victim, "live-ttl")
    assert move_while_stopped(victim, rid) == [rid]
    got = s.finish()
    assert got.token_ids == want.token_ids
    assert metric(deploy, f'{FALLBACKS}{{reason="remote_failed"}}') == 1
    wait_until(lambda: idle(victim) and idle(other), what="both workers idle")


def test_cancelling_during_a_move_frees_both_workers(deploy):
    deploy.start_frontend()
    source = deploy.start_worker(*SLOW)
    target = deploy.start_worker(*SLOW)
    rid, s = stream_on(deploy, source, "live-cancel")
    target.signal(signal.SIGSTOP)  # the move's next stop cannot start its pull yet
    try:
        assert move(source, rid) == [rid]
        wait_until(
            lambda: source.metrics()["segue_worker_kv_handles_held"] == 1, what="KV handed back"
        )
        s.close()  # the client leaves mid-move
        wait_until(lambda: idle(source), what="the source freed the moved KV")
    finally:
        target.signal(signal.SIGCONT)
    wait_until(lambda: idle(target), what="the target holds nothing")
    assert metric(deploy, "segue_frontend_cancellations_total") >= 1


def test_moving_a_request_whose_client_left_does_nothing(deploy):
    deploy.start_frontend()
    w = deploy.start_worker(*SLOW)
    s = StreamReader(deploy.url, "completions", body("completions", PROMPT, N, True), "gone")
    s.read_tokens(2)
    s.close()
    wait_until(lambda: idle(w), what="the request aborted")
    assert move(w, "gone") == []
    assert idle(w) and "Handed back Request ID: gone" not in w.log()
