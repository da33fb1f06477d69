"""Bytes a hostile or broken client sends, over a plain socket: every one gets a 4xx (or, for
a body that never arrives, nothing until the client leaves), the frontend stays healthy and
logs no traceback."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
from client import body, complete
from faults import metric
from harness import wait_until


def send(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """The status line and body of the answer to `data` sent as-is."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while b"\r\n\r\n" not in out or (b"Content-Length" in out and not out.endswith(b"}")):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def post(path: str, payload: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


DEEP = b'{"model": "segue-mocker", "prompt": ' + b"[" * 300_000 + b"]" * 300_000 + b"}"
CASES = {
    "nested a million deep": (post("/v1/completions", DEEP), "nested too deeply"),
    "not json": (post("/v1/completions", b"hello there"), "not valid JSON"),
    "truncated json": (
        post("/v1/completions", b'{"model": "segue-mocker", "pro'),
        "not valid JSON",
    ),
    "not utf-8": (
        post("/v1/completions", b'{"model": "segue-mocker", "prompt": "\xff\xfe"}'),
        "not valid UTF-8",
    ),
    "json array": (post("/v1/chat/completions", b"[1, 2, 3]"), "Expected `object`"),
    "17 stop strings": (
        post(
            "/v1/completions",
            b'{"model": "segue-mocker", "prompt": "hi", "stop": ['
            + b",".join(b'"s%d"' % i for i in range(17))
            + b"]}",
        ),
        "stop",
    ),
    "a 257-character stop string": (
        post(
            "/v1/completions",
            b'{"model": "segue-mocker", "prompt": "hi", "stop": "' + b"x" * 257 + b'"}',
        ),
        "stop",
    ),
    "huge integer": (
        post(
            "/v1/completions",
            b'{"model": "segue-mocker", "prompt": "hi", "seed": 1' + b"0" * 40 + b"}",
        ),
        "seed",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_bodies_get_a_400_naming_the_problem(agg2, case):
    data, needle = CASES[case]
    out = send(agg2.url, data)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    err = json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]
    assert needle in err["message"] or needle == err.get("param"), err
    assert "Traceback" not in agg2.frontend.log()


def test_garbage_request_line_and_wrong_content_type(agg2):
    assert send(agg2.url, b"\x00\xff\xfe garbage \r\n\r\n").startswith(b"HTTP/1.0 400")
    # a JSON body is read as JSON whatever the declared content type
    ok = send(
        agg2.url,
        post(
            "/v1/completions",
            json.dumps(body("completions", "hi", 2, False)).encode(),
            content_type="text/plain",
        ),
    )
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert "Traceback" not in agg2.frontend.log()


def test_a_body_that_stops_midway_holds_nothing_once_the_client_leaves(agg2):
    u = urlsplit(agg2.url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        b'{"model": "segue-mocker", "prompt": "the'
    )
    s.close()  # gone, 470 bytes short
    wait_until(
        lambda: metric(agg2, "segue_frontend_inflight_requests") == 0, what="nothing in flight"
    )
    assert complete(agg2.url, "completions", body("completions", "hi", 2, False)).status == 200
    assert "Traceback" not in agg2.frontend.log()
    # the workers saw only the real request
    assert sum(metric(w, "segue_worker_requests_total") for w in agg2.workers) == 1


def test_a_body_sent_too_slowly_gets_a_408(deploy):
    deploy.start_frontend("--body-timeout", "0.5")
    deploy.start_worker()
    u = urlsplit(deploy.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
            b'{"model": "segue-mocker", "prompt": "the'
        )
        answer = s.recv(65536)  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"request body not received" in answer
