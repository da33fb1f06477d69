"""The OpenAI API through the official client and raw HTTP, against real processes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "segue-mocker"


def client(d) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0)


def test_completion_non_streaming_usage_and_token_ids(agg2):
    c = client(agg2)
    r = c.completions.create(
        model=MODEL,
        prompt="the cat and the dog",
        max_tokens=7,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5  # five vocabulary words, one token each
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == 12
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == 7
    assert r.choices[0].text.split() and len(r.choices[0].text.split()) == 7


def test_completion_streaming_matches_non_streaming(agg2):
    c = client(agg2)
    full = c.completions.create(model=MODEL, prompt="a long road", max_tokens=20, temperature=0)
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="a long road",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_non_streaming_and_streaming(agg2):
    c = client(agg2)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=9, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 9
    stream = c.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=9, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert content == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)


def test_stop_string_truncates_and_reports_stop(agg2):
    c = client(agg2)
    full = c.completions.create(model=MODEL, prompt="the sea", max_tokens=30, temperature=0)
    words = full.choices[0].text.split(" ")
    stop = " " + words[5]  # a word that the greedy output reaches
    want = full.choices[0].text[: full.choices[0].text.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(
                c.completions.create(
                    model=MODEL,
                    prompt="the sea",
                    max_tokens=30,
                    temperature=0,
                    stop=[stop],
                    stream=True,
                )
            )
            text = "".join(ch.choices[0].text for ch in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = c.completions.create(
                model=MODEL, prompt="the sea", max_tokens=30, temperature=0, stop=stop
            )
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == want
        assert finish == "stop"


def test_seeded_sampling_is_repeatable(agg2):
    c = client(agg2)
    a = [
        c.completions.create(model=MODEL, prompt="the moon", max_tokens=12, temperature=0.8, seed=s)
        .choices[0]
        .text
        for s in (1, 1, 2)
    ]
    assert a[0] == a[1]
    assert a[0] != a[2]


def test_models_health_live_metrics_request_id(agg2):
    c = client(agg2)
    assert [m.id for m in c.models.list().data] == [MODEL]
    h = httpx.get(agg2.url + "/health").json()
    assert h["status"] == "ok"
    assert sorted(w["pid"] for w in h["workers"]) == sorted(w.pid for w in agg2.workers)
    assert {w["role"] for w in h["workers"]} == {"aggregated"}
    assert httpx.get(agg2.url + "/live").status_code == 200
    r = httpx.post(
        agg2.url + "/v1/completions",
        headers={"X-Request-Id": "my-req-42"},
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
    )
    assert r.headers["X-Request-Id"] == "my-req-42"
    assert r.json()["id"] == "my-req-42"
    assert any("New Request ID: my-req-42" in w.log() for w in agg2.workers)
    m = agg2.frontend.metrics()
    assert m['segue_frontend_requests_total{endpoint="completions",status="200"}'] >= 1
    assert "segue_frontend_time_to_first_token_seconds_count" in m
    for w in agg2.workers:
        wm = w.metrics()
        assert wm["segue_engine_kv_blocks_total"] == 16384
        assert wm["segue_engine_running_requests"] == 0
        assert wm["segue_engine_kv_blocks_used"] == 0
        assert w.health()["status"] == "ok"


def test_round_robin_spreads_requests(agg2):
    c = client(agg2)
    for _ in range(6):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    counts = [w.metrics()["segue_worker_requests_total"] for w in agg2.workers]
    assert counts == [3, 3]


def _post(d, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        d.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=10, **kw
    )


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 20, "n": 10}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, -5]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x " * 40000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 9}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_input_gets_4xx_naming_the_field(agg2, path, body, status, param):
    r = _post(agg2, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    # nothing of this reached a worker
    assert all(w.metrics()["segue_worker_requests_total"] == 0 for w in agg2.workers)


def test_body_limit_and_unknown_route(agg2):
    r = _post(agg2, "/v1/completions", b'{"prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}')
    assert r.status_code == 413
    assert "exceeds" in r.json()["error"]["message"]
    r = httpx.get(agg2.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_no_worker_gives_503(deploy):
    deploy.start_frontend()
    r = _post(deploy, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503
    assert "no worker" in r.json()["error"]["message"]
    assert httpx.get(deploy.url + "/health").status_code == 503
    s = _post(
        deploy,
        "/v1/chat/completions",
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert s.status_code == 503


def test_serving_a_hugging_face_model_directory(deploy, hf_dir):
    from segue.tokenizer import HFTokenizer

    deploy.start_frontend("--model", str(hf_dir))
    deploy.start_worker("--model", str(hf_dir))
    c = client(deploy)
    name = hf_dir.name
    r = c.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "the fox"}], max_tokens=5, temperature=0
    )
    tok = HFTokenizer(hf_dir)
    want = len(
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": "the fox"}]),
            add_special_tokens=False,
        )
    )
    assert r.usage.prompt_tokens == want
    assert r.usage.completion_tokens == 5 and r.choices[0].message.content
    assert (
        _post(deploy, "/v1/completions", {"model": name, "prompt": "the " * 600}).json()["error"][
            "code"
        ]
        == "context_length_exceeded"
    )
