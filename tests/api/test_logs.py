"""`--log-format json`: every log line of a frontend and a worker is one JSON object with
the documented fields; a request's lines carry its id (and the worker's, its worker id),
and the documented messages keep their text, so grep finds them as in text logs."""

from __future__ import annotations

import json

import httpx
from client import body, complete


def json_lines(text: str) -> list[dict]:
    """The log lines (JSON objects) of a process's output; its ready line is plain."""
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def test_json_logs_carry_the_request_and_worker_ids(deploy):
    fe = deploy.start_frontend("--log-format", "json")
    w = deploy.start_worker("--log-format", "json")
    r = complete(deploy.url, "completions", body("completions", "the sea", 4, False), "log-req-1")
    assert r.status == 200
    w.wait_log("New Request ID: log-req-1")
    for proc in (fe, w):
        other = [
            x
            for x in proc.log().splitlines()
            if x and not x.startswith("{") and "segue " not in x.split(" ready ")[0]
        ]
        assert other == [], f"{proc.name} wrote lines that are not JSON: {other[:3]}"
        for line in json_lines(proc.log()):
            assert {"time", "level", "logger", "process", "pid", "message", "request_id"} <= set(
                line
            )
            assert line["time"].endswith("Z") and line["pid"] == proc.pid
    worker_id = httpx.get(deploy.url + "/health").json()["workers"][0]["id"]
    new = [x for x in json_lines(w.log()) if x["message"] == "New Request ID: log-req-1"]
    assert len(new) == 1
    assert new[0]["request_id"] == "log-req-1" and new[0]["worker_id"] == worker_id
    assert new[0]["logger"] == "segue.worker" and new[0]["process"] == "worker"
    listening = [x for x in json_lines(fe.log()) if x["message"].startswith("frontend listening")]
    assert listening and listening[0]["process"] == "frontend" and "worker_id" not in listening[0]


def test_text_logs_stay_the_default(deploy):
    deploy.start_frontend()
    w = deploy.start_worker()
    complete(deploy.url, "completions", body("completions", "the sea", 4, False), "log-req-2")
    w.wait_log("New Request ID: log-req-2")
    line = next(x for x in w.log().splitlines() if "New Request ID: log-req-2" in x)
    assert " INFO worker[" in line and "[log-req-2] New Request ID: log-req-2" in line
