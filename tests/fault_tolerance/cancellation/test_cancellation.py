"""Cancellation: a client that goes away stops its request everywhere, and the engine
gives back the request's slot and KV blocks (checked on the engine's own gauges)."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from client import RawRequest, StreamReader, body, complete, uid
from faults import metric, total_migrations, worker_of
from harness import Deployment, wait_until

KINDS = {  # reference scenario kinds: (endpoint kind, streaming)
    "completion": ("completions", False),
    "chat": ("chat", False),
    "chat_stream": ("chat", True),
}
LONG_PROMPT = " ".join(["the"] * 400)  # 400 tokens: 2 s of prefill at 200 tokens/s


def idle(worker) -> bool:
    m = worker.metrics()
    return (
        m["segue_engine_running_requests"] == 0
        and m["segue_engine_waiting_requests"] == 0
        and m["segue_engine_kv_blocks_used"] == 0
    )


def assert_cancelled(
    d: Deployment, worker, rid: str, aborts_before: float, cancels_before: float
) -> None:
    """Structured state first (engine gauges idle, counters), then the log lines."""
    wait_until(lambda: idle(worker), 5, what="engine gauges back to idle")
    wait_until(
        lambda: metric(worker, "segue_worker_aborts_total") == aborts_before + 1,
        5,
        what="worker abort counted",
    )
    wait_until(
        lambda: metric(d, "segue_frontend_cancellations_total") == cancels_before + 1,
        5,
        what="frontend cancellation counted",
    )
    assert f"Aborted Request ID: {rid} " in worker.log()
    assert f"Cancelled Request ID: {rid}" in d.frontend.log()
    assert total_migrations(d) == 0


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Frontend + one worker that runs one sequence at a time with a slow prefill, so every
    phase (queued, prefill, decode) can be reached on purpose."""
    d = Deployment(tmp_path_factory.mktemp("cancel"))
    d.start_frontend()
    d.start_worker("--mocker-max-num-seqs", "1", "--mocker-prefill-tps", "200")
    yield d
    d.stop()


def counters(d):
    w = d.workers[0]
    return metric(w, "segue_worker_aborts_total"), metric(d, "segue_frontend_cancellations_total")


def test_request_cancellation_aggregated(single):
    """Reference: completion, chat, then streaming chat (5 responses read), each cancelled
    once the worker has it; the worker aborts and the frontend logs the cancellation."""
    d, w = single, single.workers[0]
    for name, (kind, stream) in KINDS.items():
        rid = uid(f"ref-agg-{name}")
        before = counters(d)
        req = RawRequest(d.url, kind, body(kind, "tell me a story", 5000, stream), rid)
        w.wait_log(f"New Request ID: {rid}")
        if stream:
            req.read_events(5)
        req.close()
        assert_cancelled(d, w, rid, *before)


@pytest.mark.parametrize("abrupt", [True, False], ids=["rst", "fin"])
@pytest.mark.parametrize("phase", ["queued", "prefill", "decode"])
@pytest.mark.parametrize("name", list(KINDS))
def test_cancel_in_each_phase(single, name, phase, abrupt):
    d, w = single, single.workers[0]
    kind, stream = KINDS[name]
    rid = uid(f"phase-{name}-{phase}-{abrupt}")
    blocker = None
    if phase == "queued":  # occupy the only engine slot
        blocker = RawRequest(
            d.url, "completions", body("completions", "x", 30000, True), rid + "-blocker"
        )
        blocker.read_events(1)
    before = counters(d)
    prompt = LONG_PROMPT if phase == "prefill" else "tell me a story"
    tokens_before = metric(w, "segue_worker_output_tokens_total")
    req = RawRequest(d.url, kind, body(kind, prompt, 5000, stream), rid)
    w.wait_log(f"New Request ID: {rid}")
    if phase == "queued":
        wait_until(lambda: metric(w, "segue_engine_waiting_requests") == 1, what="queued")
    elif phase == "prefill":
        wait_until(lambda: metric(w, "segue_engine_running_requests") == 1, what="prefilling")
        assert metric(w, "segue_worker_output_tokens_total") == tokens_before
    else:
        if stream:
            req.read_events(5)
        wait_until(
            lambda: metric(w, "segue_worker_output_tokens_total") >= tokens_before + 5,
            what="decoding",
        )
    req.close(abrupt)
    if blocker is not None:
        wait_until(
            lambda: metric(w, "segue_engine_waiting_requests") == 0,
            5,
            what="queued request removed",
        )
        assert metric(w, "segue_engine_running_requests") == 1  # the blocker still runs
        assert metric(w, "segue_worker_aborts_total") == before[0] + 1
        blocker.close()
        wait_until(lambda: idle(w), 5, what="idle")
        before = (before[0] + 1, before[1] + 1)
    assert_cancelled(d, w, rid, *before)


@pytest.mark.parametrize("name", list(KINDS))
def test_disconnect_after_finish_is_a_noop(single, name):
    d, w = single, single.workers[0]
    kind, stream = KINDS[name]
    rid = uid(f"done-{name}")
    before = counters(d)
    req = RawRequest(d.url, kind, body(kind, "hi", 5, stream), rid)
    data = req.read_all()
    assert b"200 OK" in data.split(b"\r\n", 1)[0]
    req.close()
    ok = f'segue_frontend_requests_total{{endpoint="{kind}",status="200"}}'
    wait_until(lambda: metric(d, ok) >= 1, what="request counted")
    assert idle(w)
    assert counters(d) == before
    assert f"Cancelled Request ID: {rid}" not in d.frontend.log()
    assert f"Aborted Request ID: {rid} " not in w.log()


def test_cancelled_request_is_never_migrated(agg2):
    """Client gone and worker killed in the same moment: nothing is re-sent."""
    rid = "cancel-and-kill"
    req = RawRequest(agg2.url, "chat", body("chat", "a story", 5000, True), rid)
    req.read_events(5)
    victim = worker_of(agg2, rid)
    req.close()
    victim.signal(signal.SIGKILL)
    other = next(w for w in agg2.workers if w is not victim)
    wait_until(
        lambda: metric(agg2, "segue_frontend_cancellations_total") == 1, what="cancellation counted"
    )
    wait_until(lambda: len(agg2.frontend.health()["workers"]) == 1, what="victim dropped")
    assert total_migrations(agg2) == 0
    assert f"New Request ID: {rid}" not in other.log()
    assert "recreating stream" not in agg2.frontend.log()
    assert idle(other)


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_ends_request_with_clear_error(deploy, stream):
    deploy.start_frontend()
    w = deploy.start_worker()
    b = body("completions", "a story", 30000, stream, timeout=0.3)
    if stream:
        r = StreamReader(deploy.url, "completions", b, "deadline-s").finish()
        assert r.status == 200 and r.done
        assert r.error["code"] == "timeout" and r.error["param"] == "timeout"
        assert r.token_ids  # tokens flowed until the deadline
    else:
        r = complete(deploy.url, "completions", b, "deadline-n")
        assert r.status == 408 and r.error["code"] == "timeout"
    wait_until(lambda: idle(w), 5, what="idle after timeout")
    assert metric(w, "segue_worker_aborts_total") == 1


def test_frontend_default_timeout(deploy):
    deploy.start_frontend("--request-timeout", "0.3")
    w = deploy.start_worker()
    r = complete(deploy.url, "chat", body("chat", "x", 30000, False))
    assert r.status == 408 and "timed out" in r.error["message"]
    wait_until(lambda: idle(w), 5, what="idle after timeout")


def test_bystanders_are_untouched(agg2):
    prompts = [f"the {x} sings" for x in ("cat", "dog", "bird", "fish")]
    wants = [complete(agg2.url, "chat", body("chat", p, 120, False)) for p in prompts]
    readers = [
        StreamReader(agg2.url, "chat", body("chat", p, 120, True), f"by-{i}")
        for i, p in enumerate(prompts)
    ]
    victim = RawRequest(agg2.url, "chat", body("chat", "the sea", 5000, True), "by-victim")
    victim.read_events(3)
    for r in readers:
        r.read_tokens(2)
    victim.close()
    for r, want in zip(readers, wants, strict=True):
        got = r.finish()
        assert got.token_ids == want.token_ids and got.finish_reason == "length"
    assert metric(agg2, "segue_frontend_cancellations_total") == 1
    for w in agg2.workers:
        wait_until(lambda w=w: idle(w), 5, what="idle")


async def test_storm_cancel_half_of_100(agg2):
    prompts = [
        f"the {x} and the {y}"
        for x in ("cat", "dog", "bird", "fish", "horse")
        for y in ("sea", "sky")
    ]
    wants = {
        p: complete(agg2.url, "completions", body("completions", p, 60, False)).token_ids
        for p in prompts
    }
    got: dict[int, list[int]] = {}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        p = prompts[i % len(prompts)]
        b = body("completions", p, 60 if i % 2 == 0 else 30000, True)
        async with session.post(
            agg2.url + "/v1/completions", json=b, headers={"X-Request-Id": f"storm-{i}"}
        ) as r:
            ids: list[int] = []
            async for line in r.content:
                if line.startswith(b"data: {"):
                    import json

                    ev = json.loads(line[6:])
                    for ch in ev["choices"]:
                        ids += ch["token_ids"]
                    if i % 2 == 1 and len(ids) >= 3:
                        return  # leaving the block closes the connection: a cancel
            got[i] = ids

    conn = aiohttp.TCPConnector(limit=200, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        await asyncio.wait_for(asyncio.gather(*(one(s, i) for i in range(100))), 60)
    assert sorted(got) == list(range(0, 100, 2))
    for i, ids in got.items():
        assert ids == wants[prompts[i % len(prompts)]]

    def all_counted():
        return metric(agg2, "segue_frontend_cancellations_total") == 50

    await asyncio.to_thread(wait_until, all_counted, 10, 0.01, "50 cancellations")
    aborts = 0.0
    for w in agg2.workers:
        await asyncio.to_thread(wait_until, lambda w=w: idle(w), 10, 0.01, "idle")
        aborts += metric(w, "segue_worker_aborts_total")
    assert aborts == 50
    assert total_migrations(agg2) == 0
