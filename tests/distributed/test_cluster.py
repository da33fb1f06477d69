"""Several frontends, model cards and the cluster token, with real processes."""

from __future__ import annotations

import signal

import httpx
from client import StreamReader, body, complete, uid
from faults import metric, worker_of
from harness import wait_until

from segue.protocol import EngineRequest, encode_request
from segue.tokenizer import HFTokenizer

PROMPT = "the quick brown fox"


def test_frontend_learns_the_model_from_its_workers(deploy, hf_dir):
    """No --model on the frontend: it serves the workers' model with their tokenizer."""
    deploy.start_frontend()
    w = deploy.start_worker("--model", str(hf_dir))
    name = hf_dir.name
    models = [m["id"] for m in httpx.get(deploy.url + "/v1/models").json()["data"]]
    assert name in models
    b = {**body("completions", PROMPT, 12, False), "model": name}
    r = complete(deploy.url, "completions", b)
    assert r.status == 200 and len(r.token_ids) == 12
    tok = HFTokenizer(hf_dir)
    assert r.text == tok.decode(r.token_ids)  # the workers' tokenizer, not the built-in one
    assert "New Request ID" in w.log()
    # a request for the frontend's own (built-in) model is not sent to that worker
    r = httpx.post(deploy.url + "/v1/completions", json=body("completions", PROMPT, 4, False))
    assert r.status_code == 503


def test_worker_with_a_conflicting_card_is_refused(deploy, hf_dir):
    deploy.start_frontend()
    good = deploy.start_worker()
    bad = deploy.start_worker("--model", str(hf_dir), "--model-name", "segue-mocker", wait=False)
    wait_until(lambda: "refusing worker" in deploy.frontend.log(), 30, what="the refusal")
    assert "conflicts with the registered one" in deploy.frontend.log()
    urls = {w["url"] for w in httpx.get(deploy.url + "/health").json()["workers"]}
    assert urls == {good.url} and bad.url not in urls
    for _ in range(4):
        assert (
            complete(deploy.url, "completions", body("completions", PROMPT, 4, False)).status == 200
        )
    assert "New Request ID" not in bad.log()


def test_cluster_token_guards_the_request_plane(deploy, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    w = deploy.start_worker("--cluster-token-file", str(token), wait=False)
    req = encode_request(EngineRequest(request_id="x", token_ids=[5, 6], max_tokens=2))
    assert httpx.post(w.url + "/generate", content=req).status_code == 401
    bad = {"X-Segue-Cluster-Token": "s3cret-tokeN"}
    assert httpx.post(w.url + "/generate", content=req, headers=bad).status_code == 401
    assert httpx.get(w.url + "/kv/abc").status_code == 401
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    upgrade["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    assert httpx.get(w.url + "/mux", headers=upgrade).status_code == 401
    assert httpx.get(w.url + "/health").status_code == 200  # probes stay open
    stranger = deploy.start_frontend()
    deploy.wait_routable(w, frontend=stranger)
    r = httpx.post(stranger.url + "/v1/completions", json=body("completions", PROMPT, 4, False))
    assert r.status_code == 503  # every worker refused it: nothing served
    member = deploy.start_frontend("--cluster-token-file", str(token))
    deploy.wait_routable(w, frontend=member)
    assert complete(member.url, "completions", body("completions", PROMPT, 4, False)).status == 200


def test_a_dead_frontend_takes_only_its_own_requests(deploy):
    """Two frontends share the workers. Killing one aborts its in-flight request on the
    worker (KV freed); the other frontend's request finishes exactly."""
    slow = ("--mocker-step-ms", "20")
    fe1 = deploy.start_frontend()
    fe2 = deploy.start_frontend()
    deploy.start_worker(*slow)
    deploy.start_worker(*slow)
    want = complete(fe2.url, "completions", body("completions", PROMPT, 300, False))
    rid1, rid2 = uid("fe1"), uid("fe2")
    s1 = StreamReader(fe1.url, "completions", body("completions", PROMPT, 300, True), rid1)
    s2 = StreamReader(fe2.url, "completions", body("completions", PROMPT, 300, True), rid2)
    s1.read_tokens(3)
    s2.read_tokens(3)
    victim = worker_of(deploy, rid1)
    fe1.signal(signal.SIGKILL)
    victim.wait_log(f"Aborted Request ID: {rid1}")
    got = s2.finish()
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
    s1.close()
    for w in deploy.workers:
        wait_until(
            lambda w=w: metric(w, "segue_engine_running_requests") == 0, what="running back to 0"
        )
        assert metric(w, "segue_engine_kv_blocks_used") == 0
    # every reason is exported from the start, at 0: none may have counted
    assert not any(
        v for k, v in fe2.metrics().items() if k.startswith("segue_frontend_migrations_total")
    )
