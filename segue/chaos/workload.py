"""The requests of a chaos run and what became of each: a reproducible mix of completions and
chat, streamed or whole, greedy or sampled with a seed, and background streamed responses
(the Responses API) that resume at another frontend when their stream breaks, sent by
closed-loop clients; and the oracle that compares every answer with the same request's
answer in a fault-free run."""

from __future__ import annotations

import asyncio
import enum
import json
import random
import time
from collections.abc import Callable

import aiohttp
import msgspec

from segue.chaos.config import ChaosConfig, parse_range

_WORDS = (
    "the river and sea of light was in his hand for it with as on be at by had are but from "
    "or have an they which one you were all we her she there would their stone cloud road"
).split()


class RequestSpec(msgspec.Struct, frozen=True):
    index: int
    kind: str  # completion | chat | response
    stream: bool
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None

    def path(self) -> str:
        if self.kind == "response":
            return "/v1/responses"
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    def body(self, model: str) -> dict:
        if self.kind == "response":  # greedy: a response's seed is its id's, new each run
            return {
                "model": model,
                "input": self.prompt,
                "max_output_tokens": self.max_tokens,
                "temperature": 0.0,
                "background": True,
                "stream": True,
            }
        b: dict = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "return_token_ids": True,
        }
        if self.seed is not None:
            b["seed"] = self.seed
        if self.kind == "chat":
            b["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            b["prompt"] = self.prompt
        if self.stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b


def make_specs(cfg: ChaosConfig) -> list[RequestSpec]:
    """`--distinct` requests, the same for the same seed."""
    rng = random.Random(cfg.seed)
    lo_p, hi_p = parse_range(cfg.prompt_words, "--prompt-words")
    lo_t, hi_t = parse_range(cfg.max_tokens, "--max-tokens")
    kinds = cfg.mix_kinds()
    specs = []
    for i in range(cfg.n_distinct()):
        kind = rng.choice(kinds)
        words = [rng.choice(_WORDS) for _ in range(rng.randint(lo_p, hi_p))]
        sampled = rng.random() < cfg.sampled and kind != "response-stream"
        specs.append(
            RequestSpec(
                index=i,
                kind=kind.removesuffix("-stream"),  # response-stream: "response"
                stream=kind.endswith("-stream"),
                prompt=" ".join(words),
                max_tokens=rng.randint(lo_t, hi_t),
                temperature=0.8 if sampled else 0.0,
                seed=rng.randrange(1 << 31) if sampled else None,
            )
        )
    return specs


class Status(enum.StrEnum):
    OK = "ok"
    ERROR = "error"  # an HTTP error, an error event, a broken connection
    HUNG = "hung"  # no end within --request-deadline
    CANCELLED = "cancelled"  # the client walked away on purpose (a disconnect fault)


class Outcome(msgspec.Struct):
    """One request as the client saw it. Times are seconds since the run's start."""

    seq: int  # order of sending
    spec: int  # index of its RequestSpec
    start: float
    request_id: str = ""  # sent as X-Request-Id: every process's log lines name it
    first: float | None = None  # first token (TTFT = first - start)
    end: float | None = None
    status: Status = Status.OK
    http_status: int = 0
    error: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    verdict: str = ""  # the oracle's: exact | wrong | prefix (a cancelled stream's tokens so far)
    frontend: str = ""  # the frontend it was sent to
    frontend_killed: bool = False  # that frontend was SIGKILLed while it was in flight
    resumes: list[float] = msgspec.field(default_factory=list)  # a response: each gap (s)
    resent: int = 0  # a response whose frontend died before it said its id: created again


async def _read(r: aiohttp.ClientResponse, spec: RequestSpec, out: Outcome, t0: float) -> None:
    """Reads an answer into `out` as it arrives (so a caller that cancels this still holds
    what came before)."""
    out.http_status = r.status
    if r.status != 200:
        out.status = Status.ERROR
        out.error = f"HTTP {r.status}: {(await r.text())[:300]}"
        return
    if not spec.stream:
        data = await r.json()
        choice = data["choices"][0]
        out.first = time.monotonic() - t0
        out.token_ids = choice.get("token_ids") or []
        out.text = choice["message"]["content"] if spec.kind == "chat" else choice["text"]
        out.finish_reason = choice["finish_reason"]
        return
    async for line in r.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            out.status = Status.ERROR
            out.error = f"stream error: {ev['error'].get('message', '')[:300]}"
            return
        for choice in ev.get("choices") or ():
            ids = choice.get("token_ids") or []
            if ids and out.first is None:
                out.first = time.monotonic() - t0
            out.token_ids += ids
            out.text += (
                choice["delta"].get("content", "") if spec.kind == "chat" else choice["text"]
            )
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
    if out.finish_reason is None:
        out.status = Status.ERROR
        out.error = "stream ended without a finish_reason"


async def send(
    session: aiohttp.ClientSession,
    bases: Callable[[], list[str]],
    model: str,
    spec: RequestSpec,
    out: Outcome,
    t0: float,
    deadline: float,
) -> None:
    """Sends `spec` to one of the frontends `bases` names and records what became of it in
    `out`, failures included."""
    headers = {"X-Request-Id": out.request_id} if out.request_id else None
    urls = bases()
    out.frontend = urls[out.seq % len(urls)]
    try:
        async with asyncio.timeout(deadline):
            if spec.kind == "response":
                await _respond(session, bases, model, spec, out, t0)
                return
            async with session.post(
                out.frontend + spec.path(), json=spec.body(model), headers=headers
            ) as r:
                await _read(r, spec, out, t0)
    except TimeoutError:
        out.status = Status.HUNG
        out.error = f"no end within {deadline:g} s"
    except (aiohttp.ClientError, ValueError, KeyError, TypeError) as e:
        out.status = Status.ERROR
        out.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        out.end = time.monotonic() - t0


_RESPONSE_ENDS = {"response.completed": "stop", "response.incomplete": "length"}


class _Place(msgspec.Struct):
    """Where a response's reader is: its id, the last event read, when its stream broke."""

    rid: str = ""
    last: int = -1
    broke: float = 0.0


async def _respond(
    session: aiohttp.ClientSession,
    bases: Callable[[], list[str]],
    model: str,
    spec: RequestSpec,
    out: Outcome,
    t0: float,
) -> None:
    """A background streamed response, read to its end: when its stream breaks (its
    frontend died), the events after the last one read are asked of another frontend (or,
    if it broke before the response's id came, the response is created again there)."""
    at = _Place()
    url, body = out.frontend + spec.path(), spec.body(model)
    while True:
        try:
            if at.rid:
                params = {"stream": "true", "starting_after": str(at.last)}
                async with session.get(url, params=params) as r:
                    await _read_events(r, out, t0, at)
            else:
                async with session.post(url, json=body) as r:
                    await _read_events(r, out, t0, at)
        except (aiohttp.ClientError, ConnectionError) as e:
            out.error = f"{type(e).__name__}: {e}"[:300]
        if out.finish_reason is not None or out.status != Status.OK:
            return
        at.broke = time.monotonic()  # the stream ended before its end: resume elsewhere
        others = [b for b in bases() if b != out.frontend] or bases()
        out.frontend = others[(len(out.resumes) + out.resent) % len(others)]
        if at.rid:
            url = f"{out.frontend}/v1/responses/{at.rid}"
        else:  # its frontend died before it said the id: create it again there
            out.resent += 1
            url = out.frontend + spec.path()
        await asyncio.sleep(0.05)  # the supervisor's view of the frontends catches up


async def _read_events(r: aiohttp.ClientResponse, out: Outcome, t0: float, at: _Place) -> None:
    """Reads a response's events into `out`, keeping `at` current as it goes. A gap in
    the sequence numbers is an error."""
    out.http_status = r.status
    if r.status != 200:
        out.status = Status.ERROR
        out.error = f"HTTP {r.status}: {(await r.text())[:300]}"
        return
    async for line in r.content:
        if not line.startswith(b"data: "):
            continue
        ev = json.loads(line[6:])
        seq = ev["sequence_number"]
        if seq != at.last + 1:
            out.status = Status.ERROR
            out.error = f"event {seq} after event {at.last}"
            return
        if at.broke:
            out.resumes.append(time.monotonic() - at.broke)
            at.broke = 0.0
        at.last = seq
        kind = ev["type"]
        if kind == "response.created":
            at.rid = ev["response"]["id"]
        elif kind == "response.output_text.delta":
            if out.first is None:
                out.first = time.monotonic() - t0
            out.text += ev["delta"]
        elif kind in _RESPONSE_ENDS:
            out.finish_reason = _RESPONSE_ENDS[kind]
        elif kind == "response.failed":
            out.status = Status.ERROR
            out.error = f"response failed: {ev['response'].get('error')}"[:300]


def judge(out: Outcome, golden: Outcome | None) -> str:
    """The oracle: an answer is exact when its tokens, text and finish reason equal the
    fault-free run's; a cancelled stream's tokens must be a prefix of them."""
    if golden is None or golden.status != Status.OK:
        return "no-reference"
    if out.status == Status.CANCELLED:
        n = len(out.token_ids)
        return "prefix" if out.token_ids == golden.token_ids[:n] else "wrong"
    if out.status != Status.OK:
        return ""
    same = (
        out.token_ids == golden.token_ids
        and out.text == golden.text
        and out.finish_reason == golden.finish_reason
    )
    return "exact" if same else "wrong"
