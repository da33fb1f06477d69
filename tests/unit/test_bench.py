"""`segue bench` against a fake OpenAI endpoint in process: what it sends (sampling flags
included) and what it counts from the streams it reads."""

from __future__ import annotations

import argparse
import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from segue.bench import _bench, add_bench_args


async def fake_openai(bodies: list[dict]) -> TestServer:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.json())
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(request)
        for text in ("a", "b", "c"):
            event = {"choices": [{"index": 0, "text": text}]}
            await r.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        usage = {"choices": [], "usage": {"completion_tokens": 3}}
        await r.write_eof(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return r

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    server = TestServer(app)
    await server.start_server()
    return server


def bench_args(url: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_args(p)
    return p.parse_args(
        ["--url", url, "--concurrency", "2", "--duration", "0.3", "--warmup", "0",
         "--no-progress", "--max-tokens", "3", *extra]
    )  # fmt: skip


async def test_bench_sends_the_sampling_asked_for_and_counts_the_stream():
    bodies: list[dict] = []
    server = await fake_openai(bodies)
    try:
        url = str(server.make_url("")).rstrip("/")
        [greedy] = await _bench(bench_args(url, "--ignore-eos"))
        sent = bodies[-1]
        assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("m", 0.0, 3)
        assert sent["ignore_eos"] is True and sent["stream"] is True and "top_p" not in sent
        assert greedy.requests > 0 and greedy.errors == 0
        assert greedy.sse_events_per_req == 3.0
        # three tokens a request, from the usage event
        assert (
            abs(greedy.output_tokens_per_s - 3 * greedy.requests_per_s)
            < 0.01 * 3 * greedy.requests_per_s
        )
        bodies.clear()
        [sampled] = await _bench(bench_args(url, "--temperature", "0.8", "--top-p", "0.9"))
        assert {(b["temperature"], b["top_p"]) for b in bodies} == {(0.8, 0.9)}
        assert "ignore_eos" not in bodies[-1] and sampled.errors == 0
        assert len({b["prompt"] for b in bodies}) == 1  # one prompt for all by default
        bodies.clear()
        args = ("--distinct-prompts", "--prompt-tokens", "40", "--processes", "2")
        [fresh] = await _bench(bench_args(url, *args))  # two client processes
        prompts = [b["prompt"] for b in bodies]
        assert fresh.requests > 1 and len(set(prompts)) == len(prompts)
        assert {len(p.split()) for p in prompts} == {40}
    finally:
        await server.close()
