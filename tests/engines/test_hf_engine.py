"""The reference scenarios on the Hugging Face transformers engine, with a tiny Llama the
tests build themselves (random weights, fp32, EOS suppressed)."""

from __future__ import annotations

import signal

import httpx
import pytest
from client import RawRequest, StreamReader, body, complete
from faults import metric, total_migrations, worker_of
from harness import Deployment, wait_until

pytest.importorskip("torch")
pytest.importorskip("transformers")

PROMPT = "the river and the sea"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from segue.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0))


def hf_body(model, kind, prompt, n, stream, **kw):
    b = body(kind, prompt, n, stream, **kw)
    b["model"] = model.rsplit("/", 1)[-1]
    return b


def start(d: Deployment, model: str, workers: int = 1, *fe: str, roles=None) -> None:
    d.start_frontend("--model", model, *fe)
    for role in roles or ["aggregated"] * workers:
        d.start_worker("--engine", "hf", "--model", model, role=role, fast=False)
    for w in d.workers:
        if roles:
            wait_until(lambda w=w: w.log().count("joined (") >= len(roles) - 1, what="peers seen")


def idle(w) -> bool:
    m = w.metrics()
    return (
        m["segue_engine_running_requests"] == 0
        and m["segue_engine_kv_blocks_used"] == 0
        and m["segue_engine_waiting_requests"] == 0
    )


def test_greedy_output_equals_transformers_generate(deploy, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from segue.tokenizer import HFTokenizer

    start(deploy, tiny_model)
    r = complete(deploy.url, "completions", hf_body(tiny_model, "completions", PROMPT, 24, False))
    assert r.status == 200 and r.finish_reason == "length"
    ids = HFTokenizer(tiny_model).encode(PROMPT)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    want = m.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
    assert r.token_ids == want.tolist()
    assert r.usage["prompt_tokens"] == len(ids)


def test_kv_router_sends_a_shared_prefix_to_the_hf_worker_caching_it(deploy, tiny_model):
    """The hf engine's prefix cache publishes KV events like the mocker's: with `--router
    kv` a prompt sharing a long prefix goes to the worker that cached it, which reports
    and counts the cached tokens, and answers as `generate()` does (greedy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from segue.tokenizer import HFTokenizer

    start(deploy, tiny_model, 2, "--router", "kv")
    doc = " ".join(f"section {i} of the long shared document" for i in range(12))

    def ask(prompt: str, n: int, rid: str):
        return complete(
            deploy.url, "completions", hf_body(tiny_model, "completions", prompt, n, False), rid
        )

    first = ask(doc, 4, "kv-0")
    assert first.usage["prompt_tokens_details"]["cached_tokens"] == 0
    holder = worker_of(deploy, "kv-0")

    def indexed() -> int:
        workers = httpx.get(deploy.url + "/health").json()["workers"]
        return next(w["kv_blocks"] or 0 for w in workers if w["url"] == holder.url)

    wait_until(lambda: indexed() > 0, what="the holder's blocks indexed")
    prompt = f"{doc} and a question"
    r = ask(prompt, 8, "kv-1")
    assert worker_of(deploy, "kv-1") is holder
    hit = r.usage["prompt_tokens_details"]["cached_tokens"]
    assert hit >= first.usage["prompt_tokens"] - 16  # all but a partial block
    assert metric(holder, 'segue_engine_prompt_tokens_total{source="local_cache_hit"}') == hit
    ids = HFTokenizer(tiny_model).encode(prompt)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    want = m.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
    assert r.token_ids == want.tolist()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_request_migration_on_hf(deploy, tiny_model, sig):
    """Reference migration scenarios on a real model: the migrated output (re-prefilled
    on the other worker) equals an uninterrupted run."""
    deploy.start_frontend("--model", tiny_model)
    for _ in range(2):
        # no drain time: a SIGTERMed worker hands the request back at once, however fast
        # its engine would have finished it (on a GPU 1,500 tokens take well under 0.5 s)
        deploy.start_worker(
            "--engine", "hf", "--model", tiny_model, "--drain-timeout", "0", fast=False
        )
    b = hf_body(tiny_model, "chat", PROMPT, 1500, True)
    want = complete(deploy.url, "chat", {**b, "stream": False, "stream_options": None})
    rid = f"hf-mig-{sig.name}"
    s = StreamReader(deploy.url, "chat", b, rid)
    s.read_tokens(20)
    victim = worker_of(deploy, rid)
    victim.signal(sig)
    got = s.finish()
    assert got.error is None and got.token_ids == want.token_ids
    assert got.counts == want.counts and got.finish_reason == "length"
    assert total_migrations(deploy) == 1
    assert "Stream disconnected... recreating stream..." in deploy.frontend.log()
    if sig == signal.SIGTERM:  # the drain deadline moved it live, with its real KV
        assert victim.popen.wait(10) == 0
        assert f"Handed back Request ID: {rid} (live" in victim.log()
        assert metric(deploy, "segue_frontend_kv_move_fallbacks_total") == 0


def test_request_cancellation_aggregated_on_hf(deploy, tiny_model):
    start(deploy, tiny_model)
    w = deploy.workers[0]
    for i, (kind, stream) in enumerate([("completions", False), ("chat", False), ("chat", True)]):
        rid = f"hf-cancel-{i}"
        req = RawRequest(deploy.url, kind, hf_body(tiny_model, kind, PROMPT, 1500, stream), rid)
        w.wait_log(f"New Request ID: {rid}")
        if stream:
            req.read_events(5)
        req.close()
        wait_until(lambda w=w: idle(w), what="engine idle")
        wait_until(
            lambda i=i: metric(w, "segue_worker_aborts_total") == i + 1, what="abort counted"
        )
        w.wait_log(f"Aborted Request ID: {rid} ")
        deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")


@pytest.mark.parametrize("strategy", ["frontend", "decode-first", "prefill-first"])
def test_disagg_moves_real_kv_and_equals_aggregated(deploy, tiny_model, strategy):
    start(deploy, tiny_model, 0, "--disagg-strategy", strategy, roles=["prefill", "decode"])
    b = hf_body(tiny_model, "completions", PROMPT * 8, 30, False)
    got = complete(deploy.url, "completions", b)
    agg = Deployment(deploy.tmp / "agg")
    (deploy.tmp / "agg").mkdir()
    try:
        start(agg, tiny_model)
        want = complete(agg.url, "completions", b)
    finally:
        agg.stop()
    assert got.status == 200 and got.token_ids == want.token_ids
    p = next(w for w in deploy.workers if "prefill" in w.name)
    assert metric(p, "segue_worker_kv_transferred_bytes_total") > 0
    for w in deploy.workers:
        wait_until(lambda w=w: idle(w), what="idle")


def test_disagg_decode_cancel_and_kill_on_hf(deploy, tiny_model):
    start(
        deploy,
        tiny_model,
        0,
        "--disagg-strategy",
        "decode-first",
        roles=["prefill", "decode", "decode"],
    )
    rid = "hf-dc"
    req = RawRequest(deploy.url, "chat", hf_body(tiny_model, "chat", PROMPT, 1500, True), rid)
    req.read_events(5)
    req.close()
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    for w in deploy.workers:
        wait_until(lambda w=w: idle(w), what="idle")
    # 1500 tokens: about 1.5 s of decoding here, so the kill after 10 tokens lands mid-request
    b = hf_body(tiny_model, "completions", PROMPT, 1500, True)
    want = complete(deploy.url, "completions", {**b, "stream": False, "stream_options": None})
    s = StreamReader(deploy.url, "completions", b, "hf-kd")
    s.read_tokens(10)
    victim = next(w for w in deploy.workers if "decode" in w.name and "hf-kd" in w.log())
    victim.signal(signal.SIGKILL)
    got = s.finish()
    assert got.token_ids == want.token_ids and total_migrations(deploy) == 1


def test_prefill_first_remote_decode_cancel_on_hf(deploy, tiny_model):
    """Reference prefill_first_remote_decode_cancel and the single-response decode cancel,
    on real KV moved between hf workers."""
    start(deploy, tiny_model, 0, "--disagg-strategy", "prefill-first", roles=["prefill", "decode"])
    p, dw = deploy.workers
    for rid, events in (("hf-pf-rdc", 5), ("hf-pf-one", 2)):
        req = RawRequest(deploy.url, "chat", hf_body(tiny_model, "chat", PROMPT, 1500, True), rid)
        p.wait_log(f"New Request ID: {rid}")
        dw.wait_log(f"New Request ID: {rid}")
        req.read_events(events)
        req.close()
        dw.wait_log(f"Aborted Request ID: {rid} ")
        p.wait_log(f"Aborted Remote Request ID: {rid} ")
        deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
        for w in deploy.workers:
            wait_until(
                lambda w=w: idle(w) and metric(w, "segue_worker_kv_handles_held") == 0, what="idle"
            )


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory):
    """Big enough that a ~1800-token prompt takes a good fraction of a second to prefill
    on CPU, so a client can leave while the prefill is running."""
    from segue.models.tiny import build_tiny_llama

    return str(
        build_tiny_llama(
            tmp_path_factory.mktemp("slow-llama"), seed=0, hidden_size=512, layers=4, heads=8
        )
    )


@pytest.mark.parametrize("strategy", ["none", "frontend", "decode-first", "prefill-first"])
def test_cancel_during_prefill_on_hf(deploy, slow_model, strategy):
    """Reference remote_prefill_cancel (frontend, decode-first), prefill_first_prefill_cancel
    and an aggregated cancel, caught while the real model is in its prefill forward pass:
    the worker doing the prefill aborts, keeps no KV and never emits a token."""
    from segue.tokenizer import HFTokenizer

    roles = None if strategy == "none" else ["prefill", "decode"]
    start(
        deploy,
        slow_model,
        1,
        *(() if roles is None else ("--disagg-strategy", strategy)),
        roles=roles,
    )
    prefiller = deploy.workers[0]
    per = len(HFTokenizer(slow_model).encode(PROMPT + " "))
    prompt = " ".join([PROMPT] * (1800 // per))
    rid = f"hf-pc-{strategy}"
    req = RawRequest(deploy.url, "chat", hf_body(slow_model, "chat", prompt, 20, True), rid)
    prefiller.wait_log(f"New Request ID: {rid}")
    wait_until(
        lambda: metric(prefiller, "segue_engine_running_requests") == 1, what="prefill running"
    )
    req.close()
    prefiller.wait_log(f"Aborted Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    if strategy == "decode-first":
        deploy.workers[1].wait_log(f"Aborted Remote Request ID: {rid} ")
    for w in deploy.workers:
        wait_until(
            lambda w=w: idle(w) and metric(w, "segue_worker_kv_handles_held") == 0, 10, what="idle"
        )
        # aborted inside the prefill forward pass: no token ever left any worker
        assert metric(w, "segue_worker_output_tokens_total") == 0
    if strategy in ("none", "frontend", "prefill-first"):  # the decode side never saw it
        assert all(f"New Request ID: {rid}" not in w.log() for w in deploy.workers[1:])


def test_openai_features_on_hf(deploy, tiny_model):
    """n, batched prompts, logprobs (whole and streamed, echo too), stop_token_ids and a
    penalty through a real hf worker, with the openai client."""
    import openai

    start(deploy, tiny_model)
    name = tiny_model.rsplit("/", 1)[-1]
    c = openai.OpenAI(base_url=deploy.url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model=name, max_tokens=6, temperature=0, extra_body={"return_token_ids": True})
    r = c.completions.create(prompt=[PROMPT, "a long road"], n=2, logprobs=2, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    alone = c.completions.create(prompt="a long road", logprobs=2, **kw).choices[0]
    for ch in r.choices[2:]:
        assert ch.text == alone.text
        assert ch.logprobs.token_logprobs == pytest.approx(alone.logprobs.token_logprobs)
    echo = c.completions.create(prompt=PROMPT, echo=True, logprobs=1, **kw).choices[0]
    assert echo.logprobs.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in echo.logprobs.token_logprobs[1:])
    chat = dict(messages=[{"role": "user", "content": PROMPT}], **kw)
    whole = c.chat.completions.create(logprobs=True, top_logprobs=2, **chat).choices[0]
    streamed = [
        t
        for chunk in c.chat.completions.create(stream=True, logprobs=True, top_logprobs=2, **chat)
        for ch in chunk.choices
        for t in (ch.logprobs.content if ch.logprobs else [])
    ]
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs.content]
    ids = whole.model_extra["token_ids"]
    stopped = c.chat.completions.create(
        **{**chat, "extra_body": {"return_token_ids": True, "stop_token_ids": [ids[2]]}}
    ).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["token_ids"][-1] == ids[2]
    penalised = c.chat.completions.create(frequency_penalty=2.0, **chat).choices[0]
    assert penalised.finish_reason == "length"
    wait_until(lambda: idle(deploy.workers[0]), what="idle")


def test_structured_output_and_forced_tool_call_on_hf(deploy, tiny_model):
    """Random weights: only the grammar makes the output JSON. A constrained request whose
    worker dies after 5 tokens ends token-identical (and valid) on the other worker; a
    required tool call parses, its arguments valid for the tool's schema."""
    import json

    pytest.importorskip("xgrammar")
    name = tiny_model.rsplit("/", 1)[-1]
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
        "required": ["ok", "n"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    b = hf_body(tiny_model, "chat", PROMPT, 60, False, response_format=fmt)
    start(deploy, tiny_model)
    want = complete(deploy.url, "chat", b)
    assert want.status == 200 and want.finish_reason == "stop", want.error
    assert set(json.loads(want.text)) == {"ok", "n"}
    faulty = deploy.start_worker(
        "--engine", "hf", "--model", tiny_model, "--fault-exit-after-tokens", "5", fast=False
    )
    for i in range(2):  # round-robin: one of two lands on the faulty worker
        got = complete(deploy.url, "chat", b, f"hf-so-{i}")
        assert got.status == 200 and got.token_ids == want.token_ids and got.text == want.text
        if f"New Request ID: hf-so-{i}" in faulty.log():
            break
    else:
        raise AssertionError("no request reached the faulty worker")
    assert total_migrations(deploy) == 1
    tool = {"type": "function", "function": {"name": "tide", "parameters": schema}}
    forced = hf_body(tiny_model, "chat", PROMPT, 80, False, tools=[tool], tool_choice="required")
    import httpx

    r = httpx.post(deploy.url + "/v1/chat/completions", json=forced, timeout=60).json()
    ch = r["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and r["model"] == name, r
    (call,) = ch["message"]["tool_calls"]
    assert call["function"]["name"] == "tide"
    assert set(json.loads(call["function"]["arguments"])) == {"ok", "n"}
