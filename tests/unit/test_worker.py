"""A real worker (aiohttp server, file discovery) in this process around a scripted engine:
drain, hand back, abort on a caller that leaves, the engine monitor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fakes import ScriptedEngine, reference
from harness_async import wait_for

from segue.discovery import Instance
from segue.discovery.file import FileDiscovery
from segue.engines.base import EngineInput
from segue.failures import Failure, FailureReason
from segue.protocol import (
    EngineRequest,
    Error,
    ErrorCode,
    Final,
    Frame,
    HandBack,
    KeepAlive,
    PlaneKind,
    Role,
    Tokens,
    token_digest,
)
from segue.transport import RequestPlane
from segue.worker.config import WorkerConfig
from segue.worker.kv_store import KvStore
from segue.worker.lifecycle import Worker
from segue.worker.metrics import WorkerMetrics
from segue.worker.monitor import check_engine
from segue.worker.session import EngineFailure, EngineSessions

PROMPT = [3, 1, 4]


class Running:
    def __init__(self, tmp: Path, plane: PlaneKind, **cfg: float) -> None:
        self.engine = ScriptedEngine()
        self.disc = FileDiscovery(str(tmp), "default")
        opts = {"keepalive": 0.05, **cfg}
        self.cfg = WorkerConfig(discovery=f"file:{tmp}", **opts)  # type: ignore[arg-type]
        self.stop = asyncio.Event()
        self.worker = Worker(self.engine, self.disc, self.cfg)
        self.task = asyncio.create_task(self.worker.run(self.stop))
        self.session = aiohttp.ClientSession()
        self.plane = RequestPlane(self.session, plane, 30.0)

    async def ready(self) -> Running:
        await wait_for(lambda: self.disc.snapshot(), what="the worker registered")
        return self

    async def started(
        self, rid: str, made: int, n: int = 10
    ) -> tuple[AsyncGenerator[Frame, None], Frame]:
        """A call whose engine request has made `made` tokens, and its first real frame."""
        frames = self.call(rid, n)
        first = asyncio.ensure_future(next_real(frames))
        await wait_for(lambda: rid in self.engine.streams, what="the engine got the request")
        self.engine.step(made)
        return frames, await first

    def call(self, rid: str, n: int = 10, stall: float = 30.0) -> AsyncGenerator[Frame, None]:
        return self.call_at(self.worker.url, rid, n, stall)

    def call_at(
        self, url: str, rid: str, n: int = 10, stall: float = 30.0
    ) -> AsyncGenerator[Frame, None]:
        inst = Instance(id="w", role=Role.AGGREGATED, url=url, pid=0, host="h")
        req = EngineRequest(request_id=rid, token_ids=list(PROMPT), max_tokens=n)
        return self.plane.frames(inst, req, stall)

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)
        await self.plane.close()
        await self.session.close()


@contextlib.asynccontextmanager
async def _workers(tmp: Path, plane: PlaneKind) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    made: list[Running] = []

    async def make(**cfg: float) -> Running:
        r = Running(tmp, plane, **cfg)
        made.append(r)
        return await r.ready()

    try:
        yield make
    finally:
        for r in made:
            await r.close()


@pytest.fixture(params=[PlaneKind.MUX, PlaneKind.HTTP])
async def running(tmp_path, request):
    async with _workers(tmp_path, request.param) as make:
        yield make


@pytest.fixture
async def mux_running(tmp_path):
    async with _workers(tmp_path, PlaneKind.MUX) as make:
        yield make


async def next_real(frames: AsyncGenerator[Frame, None]) -> Frame:
    while True:
        f = await frames.__anext__()
        if type(f) is not KeepAlive:
            return f


async def test_drain_lets_in_flight_requests_finish(running):
    r = await running(drain_timeout=30.0)
    frames = r.call("a", n=6)
    first = asyncio.ensure_future(next_real(frames))
    await wait_for(lambda: "a" in r.engine.streams, what="the engine got the request")
    r.engine.step(2)
    assert (await first) == Tokens(0, reference(PROMPT, 6)[:2])
    r.stop.set()
    await wait_for(lambda: r.worker.draining and not r.disc.snapshot(), what="left discovery")
    inst_url = r.worker.url
    async with r.session.post(inst_url + "/generate", data=b"") as resp:  # new work refused
        assert resp.status == 400  # not a request at all: a 400, not a crash
    late = [f async for f in _until_final(r.call_at(inst_url, "b"))]
    assert late == [Error(ErrorCode.DRAINING, late[0].message, True)]  # type: ignore[union-attr]
    r.engine.step(4)
    rest = [f async for f in _until_final(frames)]
    assert rest[-1] == Final("length", 6)
    assert await asyncio.wait_for(r.task, 10) == 0 and r.engine.aborted == []


async def test_drain_timeout_hands_requests_back(running):
    r = await running(drain_timeout=0.2)
    frames, _ = await r.started("a", made=3)
    r.stop.set()
    rest = [f async for f in _until_final(frames)]
    back = rest[-1]
    assert type(back) is HandBack and back.kv is not None  # live: with its KV
    assert r.engine.aborted == [] and not r.worker.sessions.active
    assert not r.task.done()  # the draining worker waits for its KV to be pulled
    async with r.session.get(r.worker.url + f"/kv/{back.kv.kv_id}") as resp:
        assert resp.status == 200
    assert await asyncio.wait_for(r.task, 10) == 0
    assert r.worker.metrics.aborts._value.get() == 0  # handed back, not a caller's abort


async def test_drain_hands_back_without_kv_what_cannot_be_exported(running):
    r = await running(drain_timeout=0.2)
    r.engine.export = lambda rid: False  # type: ignore[method-assign]
    frames, _ = await r.started("a", made=3)
    r.stop.set()
    rest = [f async for f in _until_final(frames)]
    assert rest[-1] == HandBack("worker shutting down")
    assert r.engine.aborted == ["a"] and not r.worker.sessions.active
    assert await asyncio.wait_for(r.task, 10) == 0


async def test_caller_leaving_aborts_the_engine_request(running):
    r = await running()
    frames = r.call("a")
    first = asyncio.ensure_future(next_real(frames))
    await wait_for(lambda: "a" in r.engine.streams, what="the engine got the request")
    r.engine.step(1)
    await first
    await frames.aclose()
    await wait_for(lambda: r.engine.aborted == ["a"], what="the engine request aborted")
    await wait_for(lambda: r.worker.metrics.aborts._value.get() == 1, what="abort counted")
    assert r.engine.stats().running == 0 and not r.worker.sessions.active


async def test_monitor_finds_a_hung_and_a_dead_engine():
    engine = ScriptedEngine()
    metrics = WorkerMetrics(engine)
    s = EngineSessions(engine, metrics, KvStore(engine, 30.0, metrics.registry), keepalive=0.05)
    assert check_engine(engine, s, 10.0, s.progress + 60.0) is None  # idle is not hung
    stream = engine.add_request(EngineInput("x", [1], 5))
    s.active["x"] = stream
    assert check_engine(engine, s, 10.0, s.progress + 5.0) is None
    why = check_engine(engine, s, 10.0, s.progress + 11.0)
    assert why and "no progress" in why and s.failure is EngineFailure.HUNG
    assert stream.finish_reason == "error"
    s.failure = None
    engine.alive = False
    assert check_engine(engine, s, 10.0, s.progress) == "engine died"
    assert s.failure is EngineFailure.DEAD


async def _until_final(frames: AsyncGenerator[Frame, None]) -> AsyncGenerator[Frame, None]:
    async for f in frames:
        if type(f) is KeepAlive:
            continue
        yield f
        if type(f) in (Final, HandBack, Error):
            return


def _count_messages(r: Running) -> list[int]:
    """Sizes of the messages the worker's one mux connection sends from now on."""
    (server,) = r.worker.routes.muxes
    ws = server.out.ws
    send = ws.send_bytes
    sizes: list[int] = []

    async def counting(data: bytes, *args: object, **kwargs: object) -> None:
        sizes.append(len(data))
        await send(data, *args, **kwargs)  # type: ignore[arg-type]

    ws.send_bytes = counting  # type: ignore[method-assign]
    return sizes


async def test_mux_sends_one_message_per_engine_step_for_all_calls(mux_running):
    r = await mux_running(keepalive=30.0)
    calls = [r.call(f"c{i}", n=4) for i in range(8)]
    firsts = [asyncio.ensure_future(next_real(c)) for c in calls]
    await wait_for(lambda: len(r.engine.streams) == 8, what="the engine got every call")
    sizes = _count_messages(r)
    r.engine.step(1)
    want = reference(PROMPT, 4)
    assert await asyncio.gather(*firsts) == [Tokens(0, want[:1])] * 8
    assert len(sizes) == 1  # eight calls' tokens in one write
    r.engine.step(3)
    for c in calls:
        rest = [f async for f in _until_final(c)]
        assert rest == [Tokens(1, want[1:]), Final("length", 4)]
    assert len(sizes) == 2  # the last tokens, the finals and the ends: one more


async def test_mux_broken_connection_fails_and_aborts_every_call_on_it(mux_running):
    r = await mux_running(keepalive=30.0)
    calls = [r.call(f"c{i}") for i in range(3)]
    firsts = [asyncio.ensure_future(next_real(c)) for c in calls]
    await wait_for(lambda: len(r.engine.streams) == 3, what="the engine got every call")
    r.engine.step(1)
    await asyncio.gather(*firsts)
    (server,) = r.worker.routes.muxes
    assert list(r.plane.mux._conns) == [r.worker.url]
    await server.ws.close()
    for c in calls:
        with pytest.raises(Failure) as e:
            await next_real(c)
        assert e.value.reason is FailureReason.STREAM_BROKEN
    await wait_for(lambda: sorted(r.engine.aborted) == ["c0", "c1", "c2"], what="aborts")
    assert not r.worker.sessions.active and r.worker.routes.calls == 0
    # The caller forgets the closed connection (a restarted worker comes back on another
    # address: one kept per old address grew the frontend in a 10-minute chaos soak).
    await wait_for(lambda: not r.plane.mux._conns, what="the closed connection forgotten")


async def test_mux_a_worker_silent_on_every_call_loses_the_connection(mux_running):
    r = await mux_running(keepalive=30.0)
    patient = r.call("patient", stall=30.0)
    waiting = asyncio.ensure_future(next_real(patient))
    await wait_for(lambda: "patient" in r.engine.streams, what="the first call arrived")
    with pytest.raises(Failure) as e:
        await next_real(r.call("hasty", stall=0.3))
    assert e.value.reason is FailureReason.STALL
    # The connection was silent as long as the stall timeout: the patient call fails
    # with it instead of waiting out its own 30 s.
    with pytest.raises(Failure) as e:
        await asyncio.wait_for(waiting, 10)
    assert e.value.reason is FailureReason.STREAM_BROKEN
    await wait_for(lambda: sorted(r.engine.aborted) == ["hasty", "patient"], what="aborts")


async def test_mux_malformed_message_closes_only_that_connection(mux_running):
    r = await mux_running()
    async with r.session.ws_connect(r.worker.url + "/mux") as ws:
        await ws.send_bytes(b"\x07not a record")
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    frames = r.call("after", n=2)
    first = asyncio.ensure_future(next_real(frames))
    await wait_for(lambda: "after" in r.engine.streams, what="the worker still serves")
    r.engine.step(2)
    assert await first == Tokens(0, reference(PROMPT, 2))


async def test_mux_garbage_from_a_peer_is_a_bad_frame():
    async def garbage(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # the OPEN
        await ws.send_bytes(b"\x00\x00\x00\x01")  # a record cut short
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/mux", garbage)
    server = TestServer(app)
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        plane = RequestPlane(session, PlaneKind.MUX, 5.0)
        url = str(server.make_url("")).rstrip("/")
        inst = Instance(id="g", role=Role.AGGREGATED, url=url, pid=0, host="h")
        req = EngineRequest(request_id="g", token_ids=list(PROMPT), max_tokens=2)
        with pytest.raises(Failure) as e:
            await next_real(plane.frames(inst, req, 5.0))
        assert e.value.reason is FailureReason.BAD_FRAME and e.value.instance == inst
        await plane.close()
    await server.close()


@pytest.mark.parametrize("made", [1, 5, 9])  # first token, mid-stream, the last but one
async def test_a_move_hands_back_the_kv_of_exactly_what_the_caller_has(running, made):
    r = await running()
    frames, first = await r.started("m", made)
    got = [first]
    assert r.worker.sessions.move(["m", "unknown"]) == ["m"]
    got += [f async for f in _until_final(frames)]
    tokens = [t for f in got if type(f) is Tokens for t in f.token_ids]
    context = PROMPT + tokens
    assert tokens == reference(PROMPT, 10)[:made]
    back = got[-1]
    assert type(back) is HandBack and back.kv is not None
    assert back.kv.num_tokens == len(context) and back.kv.digest == token_digest(context)
    assert back.kv.url == r.worker.url
    async with r.session.get(r.worker.url + f"/kv/{back.kv.kv_id}") as resp:
        assert resp.status == 200 and await resp.read() == msgspec.msgpack.encode(context)
    assert r.engine.held == {} and r.worker.kv.empty.is_set()  # pulled: freed
    assert r.worker.metrics.live_moves._value.get() == 1
