"""API keys and load limits, with real processes: 401s in OpenAI's shape, keys reloaded on
SIGHUP, a worker's admission limit (retry elsewhere, 429 when every worker is full) and the
frontend's own --max-inflight (503), each with Retry-After and counted."""

from __future__ import annotations

import json
import signal
import socket

import httpx
from client import StreamReader, body
from faults import metric
from harness import wait_until

PROMPT = "the river runs to the sea"
SLOW = ["--mocker-step-ms", "20"]  # 200 tokens hold a worker for 4 s


def post(url: str, n: int = 4, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        url + "/v1/completions",
        json=body("completions", PROMPT, n, False),
        headers=headers,
        timeout=30,
    )


def test_api_keys_guard_everything_but_probes_and_reload_on_sighup(deploy, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# deployment keys\nsk-first\n\nsk-second\n")
    fe = deploy.start_frontend("--api-key-file", str(keys))
    deploy.start_worker()
    for bad in (None, "sk-wrong", "sk-firstx"):
        r = post(deploy.url, key=bad)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(deploy.url + "/v1/models")
    assert r.status_code == 401
    assert post(deploy.url, key="sk-first").status_code == 200
    assert post(deploy.url, key="sk-second").status_code == 200
    for path in ("/health", "/live", "/metrics", "/openapi.json"):
        assert httpx.get(deploy.url + path).status_code == 200, path
    keys.write_text("sk-third\n")
    fe.signal(signal.SIGHUP)
    wait_until(lambda: post(deploy.url, key="sk-third").status_code == 200, what="reloaded")
    assert post(deploy.url, key="sk-first").status_code == 401


def test_protected_metrics_need_a_key(deploy, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-1\n")
    deploy.start_frontend("--api-key-file", str(keys), "--protect-metrics", "true")
    deploy.start_worker()
    assert httpx.get(deploy.url + "/metrics").status_code == 401
    r = httpx.get(deploy.url + "/metrics", headers={"Authorization": "Bearer sk-1"})
    assert r.status_code == 200 and "segue_frontend_requests_total" in r.text


def test_a_full_worker_refuses_at_once_and_the_request_goes_elsewhere(deploy):
    deploy.start_frontend()
    full = deploy.start_worker(*SLOW, "--max-pending", "1")
    hold = StreamReader(deploy.url, "completions", body("completions", PROMPT, 200, True), "hold")
    hold.read_tokens(1)  # the only worker yet: now at its limit
    other = deploy.start_worker(*SLOW)
    for _ in range(2):  # round-robin: one of the two asks the full worker first
        assert post(deploy.url).status_code == 200
    assert metric(full, "segue_worker_rejections_total") >= 1
    assert metric(other, "segue_worker_requests_total") == 2
    assert metric(deploy, "segue_frontend_migrations_total") == 0  # not a migration
    hold.close()


def test_every_worker_full_is_a_429_with_retry_after(deploy):
    deploy.start_frontend()
    w = deploy.start_worker(*SLOW, "--max-pending", "1")
    hold = StreamReader(deploy.url, "completions", body("completions", PROMPT, 200, True), "h1")
    hold.read_tokens(1)
    r = post(deploy.url)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "overloaded"
    assert metric(deploy, 'segue_frontend_rejections_total{reason="overloaded"}') == 1
    assert metric(w, "segue_worker_rejections_total") == 1
    assert metric(deploy, "segue_frontend_migrations_total") == 0
    hold.close()


def test_kv_admission_limit_refuses_what_the_kv_cache_could_not_hold(deploy):
    """--max-pending-kv 1 with 64 blocks of 16 tokens: one call needing 1000 tokens of KV
    holds the worker; another needing 100 more is refused at once, one needing 10 is not."""
    deploy.start_frontend()
    w = deploy.start_worker(*SLOW, "--mocker-kv-blocks", "64", "--max-pending-kv", "1")
    prompt = " ".join(["the"] * 10)  # one token per word with the built-in tokenizer
    hold = StreamReader(
        deploy.url, "completions", body("completions", prompt, 990, True), "kv-hold"
    )
    hold.read_tokens(1)
    r = httpx.post(
        deploy.url + "/v1/completions", json=body("completions", prompt, 90, False), timeout=30
    )
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "overloaded"  # by KV: --max-pending is 1024
    assert post(deploy.url, n=1).status_code == 200  # 5 + 1 tokens: room for that
    assert metric(w, "segue_worker_rejections_total") == 1
    hold.close()


def test_the_frontends_own_limit_is_a_503_with_retry_after(deploy):
    deploy.start_frontend("--max-inflight", "1")
    deploy.start_worker(*SLOW)
    hold = StreamReader(deploy.url, "completions", body("completions", PROMPT, 200, True), "h1")
    hold.read_tokens(1)  # in flight at the frontend until closed
    r = post(deploy.url)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert metric(deploy, 'segue_frontend_rejections_total{reason="max_inflight"}') == 1
    hold.close()
    wait_until(lambda: post(deploy.url).status_code == 200, what="room again")


def test_a_client_that_stops_reading_is_cancelled_and_frees_the_worker(deploy):
    deploy.start_frontend("--max-client-buffer", "65536")
    w = deploy.start_worker("--mocker-step-ms", "0.2")  # outruns a client that reads nothing
    host, port = deploy.url.removeprefix("http://").rsplit(":", 1)
    b = body("completions", PROMPT, 30000, True, return_token_ids=True)
    payload = json.dumps(b).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and reads nothing at all
    s.connect((host, int(port)))
    try:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload
        )
        wait_until(lambda: "New Request ID" in w.log(), what="the request started")
        wait_until(
            lambda: metric(deploy, "segue_frontend_cancellations_total") == 1,
            timeout=60,
            what="the request cancelled for its unread stream",
        )
        wait_until(
            lambda: (
                metric(w, "segue_engine_running_requests") == 0
                and metric(w, "segue_engine_kv_blocks_used") == 0
            ),
            what="the worker freed it",
        )
        assert metric(w, "segue_worker_aborts_total") == 1
        assert "not reading: cancelling" in deploy.frontend.log()
    finally:
        s.close()


def test_system_port_answers_probes_from_its_own_thread(deploy):
    """--system-port: /live, /health (the same view as the serving port's) and /metrics
    with the API key guard not applying; the serving port still has them too."""
    fe = deploy.start_frontend("--system-port", "0")
    deploy.start_worker()
    fe.wait_log("segue frontend system url=")
    sys_url = fe.log().split("segue frontend system url=")[1].split()[0]
    assert sys_url != deploy.url
    assert httpx.get(sys_url + "/live").json() == {"status": "live"}
    main = httpx.get(deploy.url + "/health").json()
    # the snapshot is republished every quarter second: wait for one with the worker
    wait_until(lambda: httpx.get(sys_url + "/health").json() == main, what="same health")
    assert httpx.get(sys_url + "/health").status_code == 200
    assert post(deploy.url).status_code == 200
    m = httpx.get(sys_url + "/metrics")
    assert m.status_code == 200 and "segue_frontend_requests_total" in m.text
    assert httpx.get(sys_url + "/v1/models").status_code == 404  # probes only


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_connection_cap_and_header_timeout(deploy):
    """Past --max-client-connections a new connection gets a 503 (Retry-After, OpenAI body)
    and is closed; a client that never finishes its headers gets a 408 after
    --header-timeout; service goes on for everyone else."""
    deploy.start_frontend("--max-client-connections", "3", "--header-timeout", "1")
    deploy.start_worker()
    # a connection sending nothing is closed after a second with a 408
    slow = _raw(deploy.url)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
    answer = _read_all(slow)
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    # open idle connections until one is refused: within the cap of 3
    held, refused = [], None
    try:
        for _ in range(6):
            s = _raw(deploy.url)
            s.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")  # answered, kept alive
            first = s.recv(65536)
            if first.startswith(b"HTTP/1.1 503 "):
                refused = first + _read_all(s)
                s.close()
                break
            assert first.startswith(b"HTTP/1.1 200 ")
            held.append(s)
        assert refused is not None and len(held) <= 3
        head, payload = refused.split(b"\r\n\r\n", 1)
        assert b"Retry-After: 1" in head
        assert "--max-client-connections" in json.loads(payload)["error"]["message"]
    finally:
        for s in held:
            s.close()
    wait_until(lambda: post(deploy.url).status_code == 200, what="served again")
