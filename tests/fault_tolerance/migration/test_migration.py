"""Request migration: a worker that dies, hangs, is unreachable or shuts down mid-request is
invisible to the client, whose output is token-identical to an uninterrupted run."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest
from client import StreamReader, body, complete
from faults import migrations, total_migrations, worker_of
from harness import wait_until

from segue.protocol import EngineRequest, Error, FrameParser, encode_request
from segue.worker.lifecycle import ENGINE_FAILED_EXIT

KINDS = ["completions", "chat"]
PROMPT = "the river runs to the sea"


def golden(d, kind: str, max_tokens: int, prompt: str = PROMPT):
    r = complete(d.url, kind, body(kind, prompt, max_tokens, False))
    assert r.status == 200, r.error
    return r


def assert_same(result, want) -> None:
    assert result.status == 200, result.error
    assert result.error is None, result.error
    assert result.token_ids == want.token_ids
    assert result.text == want.text
    assert result.finish_reason == want.finish_reason
    assert result.counts == want.counts  # prompt_tokens is the client's prompt


def run_in_thread(fn, *args):
    ex = cf.ThreadPoolExecutor(1)
    fut = ex.submit(fn, *args)
    ex.shutdown(wait=False)
    return fut


# -- the reference scenarios ------------------------------------------------------------


def test_request_migration_worker_failure(deploy):
    """Reference: SIGKILL the worker serving a long (8192-token) completion."""
    deploy.start_frontend("--router", "round-robin")
    for _ in range(2):
        deploy.start_worker("--mocker-step-ms", "1")
    want = golden(deploy, "completions", 8192)
    rid = "mig-kill-1"
    fut = run_in_thread(
        complete, deploy.url, "completions", body("completions", PROMPT, 8192, False), rid
    )
    victim = worker_of(deploy, rid)
    victim.signal(signal.SIGKILL)
    assert_same(fut.result(timeout=120), want)
    assert migrations(deploy, "stream_broken") == 1
    assert "Stream disconnected... recreating stream..." in deploy.frontend.log()
    survivor = next(w for w in deploy.workers if w is not victim)
    assert f"New Request ID: {rid}" in survivor.log()


def test_request_migration_graceful_shutdown(deploy):
    """Reference: SIGTERM the worker serving a long completion; it drains, hands the
    request back at its drain deadline and exits 0 within 10 s."""
    deploy.start_frontend()
    for _ in range(2):
        deploy.start_worker("--mocker-step-ms", "1", "--drain-timeout", "1")
    want = golden(deploy, "completions", 8192)
    rid = "mig-term-1"
    fut = run_in_thread(
        complete, deploy.url, "completions", body("completions", PROMPT, 8192, False), rid
    )
    victim = worker_of(deploy, rid)
    victim.signal(signal.SIGTERM)
    assert victim.popen.wait(10) == 0
    assert_same(fut.result(timeout=120), want)
    assert migrations(deploy, "drain") == 1
    assert "Stream disconnected... recreating stream..." in deploy.frontend.log()
    assert f"Handed back Request ID: {rid}" in victim.log()


# -- every failure point, token-identical -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_before_first_token(deploy, kind, stream):
    deploy.start_frontend()
    slow = ["--mocker-prefill-tps", "300"]  # the ~30-token prompt takes ~100 ms to prefill
    deploy.start_worker(*slow)
    deploy.start_worker(*slow)
    want = golden(deploy, kind, 20)
    rid = f"mig-prefill-{kind}-{stream}"
    if stream:
        s = StreamReader(deploy.url, kind, body(kind, PROMPT, 20, True), rid)
        worker_of(deploy, rid).signal(signal.SIGKILL)
        result = s.finish()
        assert result.done
    else:
        fut = run_in_thread(complete, deploy.url, kind, body(kind, PROMPT, 20, False), rid)
        worker_of(deploy, rid).signal(signal.SIGKILL)
        result = fut.result(60)
    assert_same(result, want)
    assert total_migrations(deploy) == 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_kill_mid_stream(agg2, kind, stream):
    want = golden(agg2, kind, 300)
    rid = f"mig-mid-{kind}-{stream}"
    if stream:
        s = StreamReader(agg2.url, kind, body(kind, PROMPT, 300, True), rid)
        s.read_tokens(10)
        worker_of(agg2, rid).signal(signal.SIGKILL)
        result = s.finish()
        assert result.done
    else:
        fut = run_in_thread(complete, agg2.url, kind, body(kind, PROMPT, 300, False), rid)
        victim = worker_of(agg2, rid)
        time.sleep(0.05)  # let some tokens through; the exact moment does not matter
        victim.signal(signal.SIGKILL)
        result = fut.result(60)
    assert_same(result, want)
    assert total_migrations(agg2) == 1


@pytest.mark.parametrize("point", ["first_token", "last_token", "after_last_token"])
@pytest.mark.parametrize("stream", [False, True])
def test_exact_at_precise_failure_points(deploy, point, stream):
    """A worker that dies right after sending token k (fault injection in the worker:
    os._exit after the frame), including after the last token but before the Final frame."""
    n = 12
    crash_after = {"first_token": 1, "last_token": n - 1, "after_last_token": n}[point]
    deploy.start_frontend()
    healthy = deploy.start_worker()
    want = golden(deploy, "completions", n)
    faulty = deploy.start_worker("--fault-exit-after-tokens", str(crash_after))
    for i in range(2):  # round-robin: one of two consecutive requests lands on `faulty`
        rid = f"mig-{point}-{stream}-{i}"
        b = body("completions", PROMPT, n, stream)
        result = (
            StreamReader(deploy.url, "completions", b, rid).finish()
            if stream
            else complete(deploy.url, "completions", b, rid)
        )
        assert_same(result, want)
        if f"New Request ID: {rid}" in faulty.log():
            break
    else:
        raise AssertionError("no request reached the faulty worker")
    faulty.popen.wait(5)
    assert total_migrations(deploy) == 1
    # after the last token nothing is left to generate: the request is not re-sent
    resent = f"New Request ID: {rid}" in healthy.log()
    assert resent == (point != "after_last_token")


# -- other failure kinds -------------------------------------------------------------------


def test_hung_worker_migrates_after_stall_timeout(deploy):
    deploy.start_frontend("--stall-timeout", "1")
    deploy.start_worker()
    deploy.start_worker()
    want = golden(deploy, "chat", 200)
    s = StreamReader(deploy.url, "chat", body("chat", PROMPT, 200, True), "mig-stall")
    s.read_tokens(5)
    victim = worker_of(deploy, "mig-stall")
    victim.signal(signal.SIGSTOP)
    try:
        assert_same(s.finish(), want)
        assert migrations(deploy, "stall") == 1
        survivor = next(w for w in deploy.workers if w is not victim)
        before = survivor.metrics()["segue_worker_requests_total"]
        for _ in range(3):  # the hung worker is out of rotation
            assert complete(deploy.url, "chat", body("chat", "x", 2, False)).status == 200
        assert survivor.metrics()["segue_worker_requests_total"] == before + 3
    finally:
        victim.signal(signal.SIGCONT)


def test_frozen_frontend_does_not_blame_its_workers(deploy):
    """The frontend itself stops for longer than its stall timeout (a paused VM, a host
    hiccup, SIGSTOP) while its worker streams on. Running again, it reads what the worker
    sent meanwhile instead of taking the stream for a stall and migrating it (an idle event
    loop wakes from its poll with the socket readable, before its timers run)."""
    deploy.start_frontend("--stall-timeout", "1")
    w = deploy.start_worker("--mocker-step-ms", "10")
    want = golden(deploy, "chat", 200)
    s = StreamReader(deploy.url, "chat", body("chat", PROMPT, 200, True), "frozen-fe")
    s.read_tokens(5)
    deploy.frontend.signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        # the worker finishes while the frontend cannot read; the freeze lasts 2.5 stall
        # timeouts (its length is the scenario, not a wait for something)
        wait_until(
            lambda: w.metrics()["segue_worker_output_tokens_total"] == 400,
            what="the worker done with both requests",
        )
        wait_until(lambda: time.monotonic() - t0 > 2.5, what="a freeze past the timeout")
    finally:
        deploy.frontend.signal(signal.SIGCONT)
    assert_same(s.finish(), want)
    assert total_migrations(deploy) == 0


def test_hung_engine_in_live_worker_fails_over(deploy):
    """The engine stops making progress while its worker lives on and keeps every caller's
    stall timer quiet with keep-alives: the worker's engine watchdog fails the request over
    (token-identical on the other worker), leaves discovery and exits."""
    deploy.start_frontend("--stall-timeout", "60")  # not what catches it
    deploy.start_worker()
    want = golden(deploy, "chat", 200)
    victim = deploy.start_worker(
        "--fault-engine-hang-after-tokens", "20", "--engine-stall-timeout", "1"
    )
    # round-robin: one of the two lands on the victim
    streams = [
        StreamReader(deploy.url, "chat", body("chat", PROMPT, 200, True), f"eng-hang-{i}")
        for i in range(2)
    ]
    for s in streams:
        assert_same(s.finish(), want)
    assert migrations(deploy, "engine_hung") == 1 and total_migrations(deploy) == 1
    # a hung engine does not come back: the worker leaves discovery and exits for a restart
    assert victim.popen.wait(15) == ENGINE_FAILED_EXIT
    assert "engine made no progress" in victim.log()
    assert "Aborted Request ID" not in victim.log()  # nobody left: not a caller's abort
    wait_until(
        lambda: victim.pid not in [w["pid"] for w in deploy.frontend.health()["workers"]],
        5,
        what="the failed worker gone from the frontend",
    )
    assert complete(deploy.url, "chat", body("chat", PROMPT, 5, False)).status == 200


def test_slow_prefill_is_not_a_hang(deploy):
    """Keep-alive frames during a 2.5 s prefill keep a 1 s stall timer from firing."""
    deploy.start_frontend("--stall-timeout", "1")
    deploy.start_worker("--mocker-prefill-tps", "20", "--keepalive", "0.2")
    r = complete(deploy.url, "completions", body("completions", PROMPT, 3, False))
    assert r.status == 200 and len(r.token_ids) == 3
    assert total_migrations(deploy) == 0


def _register_fake(tmp_path, wid: str, url: str) -> None:
    """A discovery entry for something that is not a working segue worker."""
    entry = {
        "instance": {
            "id": wid,
            "role": "aggregated",
            "url": url,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "model": "",
        },
        "expires_at": time.time() + 600,
    }
    (tmp_path / "discovery" / "default" / f"{wid}.json").write_text(json.dumps(entry))


def test_unreachable_worker_is_skipped_and_taken_out_of_rotation(agg2, tmp_path):
    want = golden(agg2, "completions", 20)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    _register_fake(tmp_path, "stale-1", f"http://127.0.0.1:{dead_port}")
    wait_until(
        lambda: len(httpx.get(agg2.url + "/health").json()["workers"]) == 3, what="stale entry seen"
    )
    for i in range(6):
        assert_same(
            complete(agg2.url, "completions", body("completions", PROMPT, 20, False), f"stale-{i}"),
            want,
        )
    assert migrations(agg2, "connection_refused") == 1  # tried once, then never again
    h = httpx.get(agg2.url + "/health").json()
    assert [w["routable"] for w in h["workers"] if w["id"] == "stale-1"] == [False]


@pytest.mark.parametrize(
    ("plane", "reason"),
    # Over mux the garbage already fails the WebSocket handshake: a 200 is not a 101.
    [("http", "bad_frame"), ("mux", "http_error")],
)
def test_peer_speaking_garbage_is_a_failed_worker(deploy, tmp_path, plane, reason):
    """A 200 answer whose body is not segue frames: migrated, never a 500."""
    import http.server

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"\x00\x00\x00\x05hello")

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    deploy.start_frontend("--request-plane", plane)
    deploy.start_worker()
    deploy.start_worker()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        want = golden(deploy, "chat", 20)
        _register_fake(tmp_path, "garbage-1", f"http://127.0.0.1:{srv.server_port}")
        wait_until(
            lambda: len(httpx.get(deploy.url + "/health").json()["workers"]) == 3,
            what="fake entry seen",
        )
        for i in range(4):
            assert_same(
                complete(deploy.url, "chat", body("chat", PROMPT, 20, False), f"garbage-{i}"),
                want,
            )
        assert migrations(deploy, reason) == 1
    finally:
        srv.shutdown()


# -- giving up -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_migration_limit_zero_resends_nothing(deploy, stream):
    deploy.start_frontend("--migration-limit", "0")
    deploy.start_worker()
    deploy.start_worker()
    rid = f"nolimit-{stream}"
    b = body("completions", PROMPT, 500, stream)
    if stream:
        s = StreamReader(deploy.url, "completions", b, rid)
        s.read_tokens(5)
        victim = worker_of(deploy, rid)
        victim.signal(signal.SIGKILL)
        r = s.finish()
        assert r.status == 200 and r.done
        assert "migration limit" in r.error["message"]
        assert r.finish_reason is None
    else:
        fut = run_in_thread(complete, deploy.url, "completions", b, rid)
        victim = worker_of(deploy, rid)
        victim.signal(signal.SIGKILL)
        r = fut.result(60)
        assert r.status == 503
        assert "migration limit" in r.error["message"]
    assert "Cannot recreate stream: migration limit 0 reached" in deploy.frontend.log()
    assert total_migrations(deploy) == 0
    other = next(w for w in deploy.workers if w is not victim)
    assert f"New Request ID: {rid}" not in other.log()


def test_all_workers_killed_gives_clear_error(agg2):
    s = StreamReader(agg2.url, "chat", body("chat", PROMPT, 1000, True), "all-dead")
    s.read_tokens(5)
    for w in agg2.workers:
        w.signal(signal.SIGKILL)
    r = s.finish()
    assert r.done and r.error is not None
    assert "Cannot recreate stream" in agg2.frontend.log()
    r2 = complete(agg2.url, "chat", body("chat", PROMPT, 5, False))
    assert r2.status == 503


# -- bystanders, draining, rolling restart -------------------------------------------------


def test_only_requests_on_the_failed_worker_migrate(agg2):
    prompts = [f"the {w} and the sea" for w in ("cat", "dog", "bird", "fish", "horse", "star")]
    wants = [golden(agg2, "completions", 150, p) for p in prompts]
    readers = [
        StreamReader(agg2.url, "completions", body("completions", p, 150, True), f"conc-{i}")
        for i, p in enumerate(prompts)
    ]
    for r in readers:
        r.read_tokens(3)
    victim = worker_of(agg2, "conc-0")
    on_victim = sum(f"New Request ID: conc-{i}" in victim.log() for i in range(6))
    victim.signal(signal.SIGKILL)
    for r, want in zip(readers, wants, strict=True):
        assert_same(r.finish(), want)
    assert on_victim == 3
    assert total_migrations(agg2) == on_victim


def test_draining_worker_answers_new_calls_with_retryable_frame(deploy):
    deploy.start_frontend()
    w = deploy.start_worker("--drain-timeout", "1.5")
    want = golden(deploy, "completions", 1500)  # 3 s of decoding: outlives the drain timeout
    s = StreamReader(deploy.url, "completions", body("completions", PROMPT, 1500, True), "dr-1")
    s.read_tokens(2)
    w.signal(signal.SIGTERM)
    wait_until(lambda: w.health()["status"] == "draining", what="draining status")
    raw = httpx.post(
        w.url + "/generate",
        content=encode_request(EngineRequest(request_id="direct", token_ids=[5, 6], max_tokens=3)),
        timeout=5,
    )
    frames = FrameParser().feed(raw.content)
    assert len(frames) == 1 and isinstance(frames[0], Error)
    assert frames[0].code == "draining" and frames[0].retryable
    deploy.start_worker()  # somewhere to hand the long request back to
    assert_same(s.finish(), want)
    assert w.popen.wait(10) == 0
    assert migrations(deploy, "drain") == 1


def test_drain_finishes_short_requests_in_place(agg2):
    want = golden(agg2, "completions", 100)
    s = StreamReader(agg2.url, "completions", body("completions", PROMPT, 100, True), "dr-2")
    s.read_tokens(2)
    victim = worker_of(agg2, "dr-2")
    victim.signal(signal.SIGTERM)
    assert_same(s.finish(), want)
    assert victim.popen.wait(10) == 0
    assert total_migrations(agg2) == 0


def test_second_signal_exits_at_once(deploy):
    deploy.start_frontend()
    w = deploy.start_worker()
    s = StreamReader(deploy.url, "completions", body("completions", PROMPT, 5000, True), "sig2")
    s.read_tokens(2)
    w.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in w.log(), what="drain start")
    w.signal(signal.SIGTERM)
    assert w.popen.wait(2) != 0
    s.close()


def test_frontend_sigterm_finishes_open_streams(agg2):
    want = golden(agg2, "completions", 200)
    s = StreamReader(agg2.url, "completions", body("completions", PROMPT, 200, True), "fe-term")
    s.read_tokens(3)
    agg2.frontend.signal(signal.SIGTERM)
    assert_same(s.finish(), want)
    assert agg2.frontend.popen.wait(10) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(agg2.url + "/health")


def test_rolling_restart_under_load_has_no_client_errors(deploy):
    """Restart every worker in turn (SIGTERM, 0.2 s drain so long requests are handed back,
    start a replacement) while four clients keep sending requests."""
    deploy.start_frontend()
    drain = ("--drain-timeout", "0.2")
    deploy.start_worker(*drain)
    deploy.start_worker(*drain)
    prompts = [f"the {w} runs" for w in ("cat", "dog", "bird", "fish")]
    wants = {p: golden(deploy, "chat", 200, p) for p in prompts}
    stop = threading.Event()
    results: list[tuple[str, object]] = []

    def load(p: str) -> None:
        i = 0
        while not stop.is_set() and i < 500:
            i += 1
            results.append((p, complete(deploy.url, "chat", body("chat", p, 200, False))))

    threads = [threading.Thread(target=load, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for old in list(deploy.workers):
        seen = len(results)
        wait_until(lambda s=seen: len(results) >= s + 4, 30, what="load flowing")
        wait_until(
            lambda o=old: o.metrics()["segue_engine_running_requests"] >= 1,
            what="requests in flight on the worker to restart",
        )
        old.signal(signal.SIGTERM)
        assert old.popen.wait(30) == 0
        deploy.start_worker(*drain)
    seen = len(results)
    wait_until(lambda: len(results) >= seen + 4, 30, what="load on the new workers")
    stop.set()
    for t in threads:
        t.join(60)
    for p, r in results:
        assert_same(r, wants[p])
    assert migrations(deploy, "drain") >= 2
    assert "Cannot recreate stream" not in deploy.frontend.log()
