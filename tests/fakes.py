"""In-process fakes for the unit tier: a worker that speaks the frame protocol with scripted
faults, and an engine whose every token the test releases by hand."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

from segue.discovery import Instance
from segue.engines.base import (
    Engine,
    EngineFinish,
    EngineInput,
    EngineStats,
    EngineTask,
    RequestStream,
)
from segue.engines.mocker import draw, fold
from segue.protocol import (
    CONTENT_TYPE,
    Error,
    ErrorCode,
    Final,
    FinishReason,
    HandBack,
    KeepAlive,
    Role,
    Route,
    Tokens,
    decode_request,
    encode_frame,
)

VOCAB = 1000


def next_token(context: list[int]) -> int:
    """The fakes' model: the next token is a pure function of the context."""
    return draw(fold(0, context), 0, VOCAB)


def reference(prompt: list[int], n: int) -> list[int]:
    """What an uninterrupted run makes."""
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(ctx))
    return ctx[len(prompt) :]


class Fault(enum.Enum):
    DIE = "die"  # connection closed mid-body
    END = "end"  # body ends cleanly without a final frame
    STALL = "stall"  # nothing more, connection open
    HAND_BACK = "hand_back"
    ERROR = "error"  # an Error frame with `code`
    GARBAGE = "garbage"  # bytes that are not a frame
    HTTP_500 = "http_500"
    GAP = "gap"  # a Tokens frame whose offset skips ahead


@dataclass
class Script:
    """One call's behaviour: `tokens` tokens, then the fault (None: finish normally)."""

    fault: Fault | None = None
    tokens: int = 0
    code: ErrorCode = ErrorCode.ENGINE_ERROR


@dataclass
class FakeWorker:
    """Serves /generate; call i follows scripts[i], later calls finish normally."""

    scripts: list[Script] = field(default_factory=list)
    role: Role = Role.AGGREGATED
    calls: int = 0
    cancelled: int = 0
    server: TestServer | None = None

    async def start(self) -> FakeWorker:
        app = web.Application()
        app.router.add_post(Route.GENERATE, self._generate)
        self.server = TestServer(app)
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def instance(self) -> Instance:
        assert self.server is not None
        url = str(self.server.make_url("")).rstrip("/")
        return Instance(id=f"fake-{self.server.port}", role=self.role, url=url, pid=0, host="h")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        req = decode_request(await request.read())
        script = self.scripts[self.calls] if self.calls < len(self.scripts) else Script()
        self.calls += 1
        if script.fault is Fault.HTTP_500:
            return web.Response(status=500)
        resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE})
        await resp.prepare(request)
        try:
            await self._run(req.token_ids, req.max_tokens, req.start_offset, script, resp, request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return resp

    async def _run(
        self,
        ctx: list[int],
        budget: int,
        offset: int,
        script: Script,
        resp: web.StreamResponse,
        request: web.Request,
    ) -> None:
        ctx = list(ctx)
        n = budget if script.fault is None else min(script.tokens, budget)
        for _ in range(n):
            tok = next_token(ctx)
            ctx.append(tok)
            await resp.write(encode_frame(Tokens(offset, [tok])))
            offset += 1
        await resp.write(encode_frame(KeepAlive()))
        fault = script.fault
        if fault is None:
            await resp.write_eof(encode_frame(Final(FinishReason.LENGTH, offset)))
        elif fault is Fault.DIE:
            assert request.transport is not None
            request.transport.abort()
        elif fault is Fault.END:
            await resp.write_eof()
        elif fault is Fault.STALL:
            await asyncio.Event().wait()
        elif fault is Fault.HAND_BACK:
            await resp.write_eof(encode_frame(HandBack("shutting down")))
        elif fault is Fault.ERROR:
            await resp.write_eof(encode_frame(Error(script.code, "scripted", True)))
        elif fault is Fault.GARBAGE:
            await resp.write_eof(b"\x00\x00\x00\x03abc")
        elif fault is Fault.GAP:
            tok = next_token(ctx)
            await resp.write_eof(encode_frame(Tokens(offset + 5, [tok])))


class ScriptedEngine(Engine):
    """An engine that makes a token only when the test calls `step()`: what a worker does
    around its engine can be checked at any point of a request."""

    def __init__(self) -> None:
        self.streams: dict[str, tuple[EngineInput, RequestStream]] = {}
        self.made: dict[str, list[int]] = {}
        self.aborted: list[str] = []
        self.held: dict[str, list[int]] = {}  # exported KV: the context it covers
        self.alive = True

    def add_request(self, inp: EngineInput) -> RequestStream:
        assert inp.task is EngineTask.GENERATE
        stream = RequestStream(inp.request_id)
        self.streams[inp.request_id] = (inp, stream)
        self.made[inp.request_id] = []
        return stream

    def step(self, n: int = 1) -> None:
        """Every running request makes `n` tokens (and finishes at its max_tokens)."""
        for rid, (inp, stream) in list(self.streams.items()):
            made = self.made[rid]
            for _ in range(n):
                tok = next_token(inp.token_ids + made)
                made.append(tok)
                stream.push(tok)
                if len(made) >= inp.max_tokens:
                    stream.finish(EngineFinish.LENGTH)
                    del self.streams[rid]
                    break

    def abort(self, request_id: str) -> bool:
        entry = self.streams.pop(request_id, None)
        if entry is None:
            return False
        self.aborted.append(request_id)
        entry[1].finish(EngineFinish.ABORT)
        return True

    def export(self, request_id: str) -> bool:
        """A request that made a token can be exported: its "KV" is its context."""
        if not self.made.get(request_id) or request_id not in self.streams:
            return False
        inp, stream = self.streams.pop(request_id)
        key = f"{request_id}.kv"
        self.held[key] = stream.kv_tokens = inp.token_ids + self.made[request_id]
        stream.kv_key = key
        stream.finish(EngineFinish.EXPORTED)
        return True

    def kv_payload(self, key: str) -> bytes:
        return msgspec.msgpack.encode(self.held[key])

    def kv_nbytes(self, key: str) -> int:
        return len(self.kv_payload(key))

    def release_kv(self, key: str) -> bool:
        return self.held.pop(key, None) is not None

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.streams), waiting=0, kv_blocks_used=0, kv_blocks_total=0
        )

    @property
    def healthy(self) -> bool:
        return self.alive
