"""Disaggregated prefill/decode with the three strategies: output equal to aggregated,
cancellation in every phase reaching every worker, failures of either role migrated."""

from __future__ import annotations

import concurrent.futures as cf
import signal

import httpx
import pytest
from client import RawRequest, StreamReader, body, complete, path
from faults import metric, total_migrations
from harness import Deployment, wait_until

from segue.protocol import EngineRequest, Error, FrameParser, KvHandle, Prefilled, encode_request

STRATEGIES = ["frontend", "decode-first", "prefill-first"]
PROMPT = "the quick bird and the slow river"
LONG_PROMPT = " ".join(["the"] * 400)  # 2 s of prefill at 200 tokens/s
SLOW_PREFILL = ("--mocker-prefill-tps", "200")


def idle(w) -> bool:
    m = w.metrics()
    return (
        m["segue_engine_running_requests"] == 0
        and m["segue_engine_waiting_requests"] == 0
        and m["segue_engine_kv_blocks_used"] == 0
        and m["segue_worker_kv_handles_held"] == 0
    )


def assert_all_idle(d: Deployment) -> None:
    for w in d.workers:
        if w.alive():
            wait_until(lambda w=w: idle(w), 5, what=f"{w.name} back to idle")


def start(
    d: Deployment,
    strategy: str,
    prefill: int = 1,
    decode: int = 1,
    fe_args: tuple = (),
    prefill_args: tuple = (),
    decode_args: tuple = (),
):
    d.start_frontend("--disagg-strategy", strategy, *fe_args)
    # the reference starts the second stage first; its order does not matter here
    ps = [d.start_worker(*prefill_args, role="prefill") for _ in range(prefill)]
    ds = [d.start_worker(*decode_args, role="decode") for _ in range(decode)]
    for w in ps + ds:
        wait_until(
            lambda w=w: any(
                x["url"] == w.url for x in httpx.get(d.url + "/health").json()["workers"]
            ),
            what="worker in discovery",
        )
    # workers that call peers watch discovery too: wait until each has seen the others
    for w in ps + ds:
        wait_until(
            lambda w=w: w.log().count("joined (") >= prefill + decode - 1,
            what=f"{w.name} sees its peers",
        )
    return ps, ds


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An aggregated deployment: what disaggregated output must equal."""
    d = Deployment(tmp_path_factory.mktemp("aggregated-ref"))
    d.start_frontend()
    d.start_worker()
    yield d
    d.stop()


def assert_same(result, want) -> None:
    assert result.status == 200, result.error
    assert result.error is None, result.error
    assert (result.token_ids, result.text, result.finish_reason, result.counts) == (
        want.token_ids,
        want.text,
        want.finish_reason,
        want.counts,
    )


# -- equality with aggregated ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disagg_output_equals_aggregated(deploy, reference, strategy):
    ps, ds = start(deploy, strategy)
    for kind in ("completions", "chat"):
        for stream in (False, True):
            want = complete(reference.url, kind, body(kind, PROMPT, 40, False))
            b = body(kind, PROMPT, 40, stream)
            got = (
                StreamReader(deploy.url, kind, b, f"eq-{kind}-{stream}").finish()
                if stream
                else complete(deploy.url, kind, b)
            )
            assert_same(got, want)
    # both stages really ran: the decode side pulled KV from the prefill side
    assert metric(ps[0], "segue_worker_kv_transferred_bytes_total") > 0
    assert metric(ds[0], "segue_worker_output_tokens_total") == 160
    assert metric(ps[0], "segue_worker_requests_total") == 4
    assert total_migrations(deploy) == 0
    assert_all_idle(deploy)


# -- the reference cancellation scenarios --------------------------------------------------


@pytest.mark.parametrize("strategy", ["frontend", "decode-first"])
def test_request_cancellation_decode_cancel(deploy, strategy):
    """Reference (vLLM decode_cancel, TRT-LLM decode_first_decode_cancel): streaming chat,
    id seen on decode and prefill workers, 5 responses read, cancelled during decode."""
    (p,), (dw,) = start(deploy, strategy)
    rid = f"dc-{strategy}"
    req = RawRequest(deploy.url, "chat", body("chat", PROMPT, 5000, True), rid)
    dw.wait_log(f"New Request ID: {rid}")
    p.wait_log(f"New Request ID: {rid}")
    req.read_events(5)
    req.close()
    wait_until(lambda: metric(dw, "segue_worker_aborts_total") == 1, what="decode abort")
    dw.wait_log(f"Aborted Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    assert metric(deploy, "segue_frontend_cancellations_total") == 1
    assert_all_idle(deploy)


def test_request_cancellation_decode_cancel_single_response(deploy):
    """Reference (SGLang decode_cancel): one streamed response read, then cancel; every
    worker lets go (the prefill side already handed its KV over)."""
    (p,), (dw,) = start(deploy, "decode-first")
    rid = "dc-one"
    req = RawRequest(deploy.url, "chat", body("chat", PROMPT, 5000, True), rid)
    req.read_events(2)  # the role chunk, then the first token
    req.close()
    dw.wait_log(f"Aborted Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    assert f"New Request ID: {rid}" in p.log()
    assert metric(p, "segue_worker_kv_transferred_bytes_total") > 0
    assert_all_idle(deploy)


@pytest.mark.parametrize("strategy", ["frontend", "decode-first"])
def test_request_cancellation_remote_prefill_cancel(deploy, strategy):
    """Reference (vLLM remote_prefill_cancel, TRT-LLM decode_first_remote_prefill_cancel):
    a very long prompt, cancelled while the prefill worker is still prefilling."""
    (p,), (dw,) = start(deploy, strategy, prefill_args=SLOW_PREFILL)
    rid = f"rpc-{strategy}"
    req = RawRequest(deploy.url, "completions", body("completions", LONG_PROMPT, 50, False), rid)
    p.wait_log(f"New Request ID: {rid}")
    wait_until(lambda: metric(p, "segue_engine_running_requests") == 1, what="prefilling")
    req.close()
    p.wait_log(f"Aborted Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    if strategy == "decode-first":
        dw.wait_log(f"Aborted Remote Request ID: {rid} ")
        assert metric(dw, "segue_worker_remote_aborts_total") == 1
    assert metric(dw, "segue_worker_output_tokens_total") == 0  # decode never started
    assert metric(p, "segue_worker_aborts_total") == 1
    assert_all_idle(deploy)


def test_request_cancellation_prefill_first_prefill_cancel(deploy):
    """Reference (TRT-LLM prefill_first_prefill_cancel): cancelled during the local
    prefill, before any decode worker is involved."""
    (p,), (dw,) = start(deploy, "prefill-first", prefill_args=SLOW_PREFILL)
    rid = "pf-pc"
    req = RawRequest(deploy.url, "completions", body("completions", LONG_PROMPT, 50, False), rid)
    p.wait_log(f"New Request ID: {rid}")
    wait_until(lambda: metric(p, "segue_engine_running_requests") == 1, what="prefilling")
    req.close()
    p.wait_log(f"Aborted Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    assert f"New Request ID: {rid}" not in dw.log()
    assert_all_idle(deploy)


def test_request_cancellation_prefill_first_remote_decode_cancel(deploy):
    """Reference (TRT-LLM prefill_first_remote_decode_cancel): streaming chat, 5 responses
    read during the remote decode, then cancel."""
    (p,), (dw,) = start(deploy, "prefill-first")
    rid = "pf-rdc"
    req = RawRequest(deploy.url, "chat", body("chat", PROMPT, 5000, True), rid)
    p.wait_log(f"New Request ID: {rid}")
    dw.wait_log(f"New Request ID: {rid}")
    req.read_events(5)
    req.close()
    dw.wait_log(f"Aborted Request ID: {rid} ")
    p.wait_log(f"Aborted Remote Request ID: {rid} ")
    deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
    assert metric(p, "segue_worker_remote_aborts_total") == 1
    assert_all_idle(deploy)


# -- more phases: queued for prefill, payload waiting for its pull -------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cancel_while_queued_for_prefill(deploy, strategy):
    (p,), _ = start(deploy, strategy, prefill_args=(*SLOW_PREFILL, "--mocker-max-num-seqs", "1"))
    blocker = RawRequest(
        deploy.url, "completions", body("completions", LONG_PROMPT, 5, False), f"blk-{strategy}"
    )
    p.wait_log(f"New Request ID: blk-{strategy}")
    rid = f"queued-{strategy}"
    req = RawRequest(deploy.url, "completions", body("completions", PROMPT, 50, False), rid)
    wait_until(lambda: metric(p, "segue_engine_waiting_requests") == 1, what="queued")
    req.close()
    p.wait_log(f"Aborted Request ID: {rid} ")
    assert metric(p, "segue_engine_waiting_requests") == 0
    blocker.close()
    assert_all_idle(deploy)


def test_cancelled_request_frees_unpulled_payload_at_once(deploy):
    """The decode worker is hung, so the KV waits on the prefill worker; the client leaves:
    the payload is freed now, not at its 30 s TTL."""
    (p,), (dw,) = start(deploy, "frontend")
    dw.signal(signal.SIGSTOP)
    try:
        rid = "unpulled"
        req = RawRequest(deploy.url, "completions", body("completions", PROMPT, 50, False), rid)
        wait_until(lambda: metric(p, "segue_worker_kv_handles_held") == 1, what="KV held")
        req.close()
        wait_until(lambda: metric(p, "segue_worker_kv_handles_held") == 0, 2, what="payload freed")
        assert metric(p, "segue_engine_kv_blocks_used") == 0
        assert metric(p, "segue_worker_kv_expired_total") == 0
    finally:
        dw.signal(signal.SIGCONT)
    assert_all_idle(deploy)


def _raw_generate(url: str, req: EngineRequest) -> list:
    r = httpx.post(url + "/generate", content=encode_request(req), timeout=10)
    return FrameParser().feed(r.content)


def test_unpulled_kv_expires_after_ttl_and_wrong_kv_is_an_error(deploy):
    (p,), (dw,) = start(deploy, "frontend", prefill_args=("--kv-ttl", "0.5"))
    frames = _raw_generate(
        p.url, EngineRequest(request_id="ttl", token_ids=[9, 8, 7], max_tokens=5, phase="prefill")
    )
    assert isinstance(frames[-1], Prefilled)
    kv: KvHandle = frames[-1].kv
    assert metric(p, "segue_worker_kv_handles_held") == 1
    assert metric(p, "segue_engine_kv_blocks_used") == 1
    wait_until(lambda: metric(p, "segue_worker_kv_expired_total") == 1, 3, what="expiry")
    assert metric(p, "segue_engine_kv_blocks_used") == 0
    # a decode pointing at the expired payload fails loudly, never silently
    frames = _raw_generate(
        dw.url,
        EngineRequest(request_id="late", token_ids=[9, 8, 7], max_tokens=5, phase="decode", kv=kv),
    )
    assert isinstance(frames[-1], Error) and frames[-1].code == "remote_failed"
    assert "404" in frames[-1].message
    # a handle for other tokens is refused before any pull
    frames = _raw_generate(
        p.url, EngineRequest(request_id="other", token_ids=[1, 2, 3], max_tokens=5, phase="prefill")
    )
    frames = _raw_generate(
        dw.url,
        EngineRequest(
            request_id="wrong", token_ids=[1, 2, 4], max_tokens=5, phase="decode", kv=frames[-1].kv
        ),
    )
    assert isinstance(frames[-1], Error) and frames[-1].code == "kv_mismatch"
    assert metric(dw, "segue_worker_output_tokens_total") == 0
    wait_until(lambda: metric(p, "segue_worker_kv_handles_held") == 0, 3, what="expiry")
    assert_all_idle(deploy)


# -- failures of either role ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_decode_worker_migrates(deploy, reference, strategy):
    start(deploy, strategy, prefill=1, decode=2)
    want = complete(reference.url, "chat", body("chat", PROMPT, 300, False))
    rid = f"kd-{strategy}"
    s = StreamReader(deploy.url, "chat", body("chat", PROMPT, 300, True), rid)
    s.read_tokens(10)
    decoders = [w for w in deploy.workers if "decode" in w.name]
    victim = next(w for w in decoders if f"New Request ID: {rid}" in w.log())
    victim.signal(signal.SIGKILL)
    assert_same(s.finish(), want)
    assert total_migrations(deploy) == 1
    other = next(w for w in decoders if w is not victim)
    assert f"New Request ID: {rid}" in other.log()
    assert_all_idle(deploy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_prefill_worker_migrates(deploy, reference, strategy):
    start(deploy, strategy, prefill=2, decode=1, prefill_args=SLOW_PREFILL)
    want = complete(reference.url, "completions", body("completions", LONG_PROMPT, 20, False))
    rid = f"kp-{strategy}"
    ex = cf.ThreadPoolExecutor(1)
    fut = ex.submit(
        complete, deploy.url, "completions", body("completions", LONG_PROMPT, 20, False), rid
    )
    prefillers = [w for w in deploy.workers if "prefill" in w.name]
    victim = wait_until(
        lambda: next((w for w in prefillers if f"New Request ID: {rid}" in w.log()), None),
        what="prefill worker with the request",
    )
    victim.signal(signal.SIGKILL)
    assert_same(fut.result(60), want)
    ex.shutdown()
    assert total_migrations(deploy) == 1
    other = next(w for w in prefillers if w is not victim)
    assert f"New Request ID: {rid}" in other.log()
    assert_all_idle(deploy)


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hung_worker_of_each_role_migrates(deploy, reference, strategy, role):
    stall = ("--stall-timeout", "1")
    n_prefill, n_decode = (2, 1) if role == "prefill" else (1, 2)
    # A hung prefill worker may finish its prefill once resumed, for a caller that gave up
    # on it: that KV is stranded until its TTL (2 s here) frees it.
    start(
        deploy,
        strategy,
        prefill=n_prefill,
        decode=n_decode,
        fe_args=stall,
        prefill_args=(*stall, "--kv-ttl", "2", *(SLOW_PREFILL if role == "prefill" else ())),
        decode_args=stall,
    )
    prompt = LONG_PROMPT if role == "prefill" else PROMPT
    want = complete(reference.url, "completions", body("completions", prompt, 200, False))
    rid = f"hang-{strategy}-{role}"
    s = StreamReader(deploy.url, "completions", body("completions", prompt, 200, True), rid)
    group = [w for w in deploy.workers if role in w.name]
    victim = wait_until(
        lambda: next((w for w in group if f"New Request ID: {rid}" in w.log()), None),
        what=f"{role} worker with the request",
    )
    if role == "decode":
        s.read_tokens(5)
    victim.signal(signal.SIGSTOP)
    try:
        assert_same(s.finish(), want)
        assert total_migrations(deploy) == 1
    finally:
        victim.signal(signal.SIGCONT)
    assert_all_idle(deploy)


@pytest.mark.parametrize("strategy", ["frontend", "decode-first"])
def test_no_prefill_worker_left(deploy, reference, strategy):
    (p,), (dw,) = start(deploy, strategy)
    p.signal(signal.SIGKILL)
    wait_until(lambda: len(deploy.frontend.health()["workers"]) == 1, what="prefill gone")
    wait_until(
        lambda: "left discovery" in dw.log() or strategy == "frontend",
        what="decode worker saw it go",
    )
    r = complete(deploy.url, "completions", body("completions", PROMPT, 20, False))
    assert r.status == 503 and "prefill" in r.error["message"]


@pytest.mark.parametrize("strategy", ["frontend", "decode-first"])
def test_prefill_fallback_local(deploy, reference, strategy):
    fb = ("--prefill-fallback", "local")
    (p,), (dw,) = start(deploy, strategy, fe_args=fb, decode_args=fb)
    p.signal(signal.SIGKILL)
    wait_until(lambda: len(deploy.frontend.health()["workers"]) == 1, what="prefill gone")
    wait_until(
        lambda: "left discovery" in dw.log() or strategy == "frontend",
        what="decode worker saw it go",
    )
    want = complete(reference.url, "completions", body("completions", PROMPT, 20, False))
    assert_same(complete(deploy.url, "completions", body("completions", PROMPT, 20, False)), want)
    assert_all_idle(deploy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disagg_logprobs_equal_aggregated(deploy, reference, strategy):
    """The decode side makes every token, so its logprobs are those of an aggregated run;
    echo with logprobs (the prompt's, which the decode side cannot compute) is a 400."""
    start(deploy, strategy)
    for kind, extra in (("completions", {"logprobs": 2}), ("chat", {"logprobs": True})):
        b = {**body(kind, PROMPT, 12, False), **extra}
        want = httpx.post(reference.url + path(kind), json=b, timeout=30).json()
        got = httpx.post(deploy.url + path(kind), json=b, timeout=30).json()
        assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"] is not None
    echo = {**body("completions", PROMPT, 4, False), "logprobs": 1, "echo": True}
    r = httpx.post(deploy.url + "/v1/completions", json=echo, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    assert_all_idle(deploy)
