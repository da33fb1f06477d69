"""The resilient client against fake workers: every failure kind of the failure table,
with the output checked token for token against an uninterrupted run."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest
from fakes import FakeWorker, Fault, Script, reference
from harness_async import wait_for
from prometheus_client import CollectorRegistry, Counter

from segue.discovery import Instance
from segue.failures import ACTIONS, FailureReason, Verdict
from segue.frontend.client import MigrationError, NoWorkerError, RejectedError, ResilientClient
from segue.frontend.request import RequestState
from segue.protocol import ErrorCode, FinishReason, PlaneKind
from segue.router import Router
from segue.transport import RequestPlane

PROMPT = [5, 6, 7]
N = 12


class Setup:
    def __init__(self, workers: list[FakeWorker], extra: list[Instance], limit: int) -> None:
        self.workers = workers
        self.session = aiohttp.ClientSession()
        self.router = Router(session=None)
        self.router.update({i.id: i for i in [w.instance for w in workers] + extra})
        self.registry = CollectorRegistry()
        self.migrations = Counter("m", "migrations", ["reason"], registry=self.registry)
        plane = RequestPlane(self.session, PlaneKind.HTTP, 0.3)  # the fakes serve /generate
        self.client = ResilientClient(
            self.router,
            plane,
            self.migrations,
            Counter("f", "kv move fallbacks", ["reason"], registry=self.registry),
            migration_limit=limit,
            stall_timeout=0.3,
        )

    def count(self, label: str) -> float:
        return self.registry.get_sample_value("m_total", {"reason": label}) or 0.0

    def total(self) -> float:
        return sum(
            s.value for m in self.registry.collect() for s in m.samples if s.name == "m_total"
        )

    async def run(self, max_tokens: int = N) -> tuple[list[int], FinishReason | None]:
        state = RequestState(request_id="r", prompt_ids=list(PROMPT), max_tokens=max_tokens)
        out: list[int] = []
        finish = None
        async with contextlib.aclosing(self.client.generate(state)) as gen:
            async for d in gen:
                ids, reason = d.token_ids, d.finish_reason
                out += ids
                finish = reason
        assert out == state.generated
        return out, finish


@pytest.fixture
async def setup():
    made: list[Setup] = []

    async def make(*scripts: list[Script], extra: list[Instance] = (), limit: int = 3):
        workers = [await FakeWorker(list(s)).start() for s in scripts]
        s = Setup(workers, list(extra), limit)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.session.close()
        for w in s.workers:
            await w.close()


# (fault on the first worker, tokens before it, code, reason label, counted)
MIGRATING = [
    (Fault.DIE, 4, None, "stream_broken", True),
    (Fault.END, 4, None, "stream_ended", True),
    (Fault.STALL, 4, None, "stall", True),
    (Fault.HAND_BACK, 4, None, "drain", True),
    (Fault.GARBAGE, 4, None, "bad_frame", True),
    (Fault.GAP, 4, None, "token_gap", True),
    (Fault.HTTP_500, 0, None, "http_error", True),
    (Fault.ERROR, 4, ErrorCode.ENGINE_ERROR, "engine_error", True),
    (Fault.ERROR, 4, ErrorCode.ENGINE_HUNG, "engine_hung", True),
    (Fault.ERROR, 0, ErrorCode.ENGINE_UNHEALTHY, "engine_unhealthy", True),
    (Fault.ERROR, 0, ErrorCode.KV_MISMATCH, "kv_mismatch", True),
    (Fault.ERROR, 2, ErrorCode.REMOTE_FAILED, "remote_failed", True),
    (Fault.ERROR, 0, ErrorCode.DRAINING, "draining", False),
]


@pytest.mark.parametrize(
    ("fault", "after", "code", "label", "counted"), MIGRATING, ids=[m[3] for m in MIGRATING]
)
async def test_failure_migrates_exactly(setup, fault, after, code, label, counted):
    s = await setup([Script(fault, after, code or ErrorCode.ENGINE_ERROR)], [])
    out, finish = await s.run()
    assert out == reference(PROMPT, N) and finish == FinishReason.LENGTH
    assert s.count(label) == (1 if counted else 0) and s.total() == (1 if counted else 0)
    victim = s.workers[0].instance.id
    action = ACTIONS[FailureReason(label)]
    assert (victim in s.router.down) == action.down
    assert s.workers[1].calls == 1  # the retry went to the other worker


async def test_connection_refused_migrates(setup):
    dead = Instance(id="dead", role="aggregated", url="http://127.0.0.1:9", pid=0, host="h")
    s = await setup([], extra=[dead])
    s.router.instances = {"dead": dead, **s.router.instances}  # tried first
    out, _ = await s.run()
    assert out == reference(PROMPT, N)
    assert s.count("connection_refused") == 1 and "dead" in s.router.down


@pytest.mark.parametrize(
    ("code", "error"),
    [(ErrorCode.BAD_REQUEST, RejectedError), (ErrorCode.UNAVAILABLE, NoWorkerError)],
)
async def test_failures_that_do_not_migrate(setup, code, error):
    s = await setup([Script(Fault.ERROR, 0, code)], [])
    with pytest.raises(error):
        await s.run()
    assert s.total() == 0 and s.workers[1].calls == 0
    assert ACTIONS[FailureReason(code.value)].verdict is not Verdict.RETRY


async def test_migration_limit(setup):
    s = await setup([Script(Fault.DIE, 2)], [Script(Fault.DIE, 2)], limit=1)
    with pytest.raises(MigrationError, match="migration limit"):
        await s.run()
    assert s.total() == 1


async def test_no_worker_left_after_a_failure(setup):
    s = await setup([Script(Fault.DIE, 2)])
    with pytest.raises(MigrationError, match="no worker available"):
        await s.run()


async def test_break_after_the_last_token_is_not_resent(setup):
    """Counted (the worker failed) but nothing is left to make: no second call."""
    s = await setup([Script(Fault.DIE, N)], [])
    out, finish = await s.run()
    assert out == reference(PROMPT, N) and finish == FinishReason.LENGTH
    assert s.total() == 1 and s.workers[1].calls == 0


async def test_closing_the_generation_cancels_the_call(setup):
    s = await setup([Script(Fault.STALL, 3)], [])
    s.client.stall_timeout = 60.0
    state = RequestState(request_id="r", prompt_ids=list(PROMPT), max_tokens=N)
    gen = s.client.generate(state)
    got: list[int] = []
    async for d in gen:
        got += d.token_ids
        if len(got) == 3:
            break
    await gen.aclose()
    await wait_for(lambda: s.workers[0].cancelled == 1, what="the worker's handler cancelled")
    assert s.total() == 0 and s.workers[1].calls == 0
