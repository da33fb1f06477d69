"""`segue bench`: a closed-loop load generator for any OpenAI-compatible endpoint.

Each of C clients sends one request, reads the whole response, and sends the next, for
`--duration` seconds per concurrency level. Streams are read event by event to time the
first token (TTFT) and the gaps between content events (inter-token latency; an event may
carry several tokens when the server coalesces). Token counts come from the server's usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp

_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or "
    "have an they which one you were all we her she there would their"
).split()


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=100,
        help="prompt length in words (one token each with the built-in tokenizer)",
    )
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="a fresh prompt per request (words drawn at random), so no request finds "
        "another's prefix in a server's cache; default: one prompt for all",
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM, segue)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes sharing each level's concurrency (one reads ~80,000 "
        "streamed events/s on a fast core: more for hundreds of fast streams)",
    )
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--no-progress", action="store_true")


@dataclass
class LevelResult:
    concurrency: int
    requests: int = 0
    errors: int = 0
    duration_s: float = 0.0
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    ttft_ms_p50: float = 0.0
    ttft_ms_p99: float = 0.0
    itl_ms_p50: float = 0.0
    itl_ms_p99: float = 0.0
    latency_ms_p50: float = 0.0
    latency_ms_p99: float = 0.0
    sse_events_per_req: float = 0.0  # streamed events with choices, per request
    error_samples: list[str] = field(default_factory=list)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000.0


@dataclass
class _Stats:
    """What one process's clients saw in the measured window (merged across processes)."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    lat: list[float] = field(default_factory=list)
    tokens: int = 0
    events: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # the measured window, to its last request's end

    def merge(self, other: _Stats) -> None:
        self.elapsed = max(self.elapsed, other.elapsed)
        self.ttft += other.ttft
        self.itl += other.itl
        self.lat += other.lat
        self.tokens += other.tokens
        self.events += other.events
        self.requests += other.requests
        self.errors += other.errors


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict, stream: bool, st: _Stats | None
) -> None:
    t0 = time.perf_counter()
    ttft = None
    last = t0
    gaps: list[float] = []
    tokens = 0
    events = 0
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            if stream:
                async for line in r.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(f"stream error: {ev['error'].get('message')}")
                    if ev.get("usage"):
                        tokens = ev["usage"]["completion_tokens"]
                    if ev.get("choices"):
                        events += 1
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
            else:
                data = await r.json()
                tokens = data["usage"]["completion_tokens"]
    except (aiohttp.ClientError, RuntimeError, TimeoutError, ValueError) as e:
        if st is not None:
            st.errors.append(str(e)[:200] or type(e).__name__)
        return
    if st is None:
        return
    st.requests += 1
    st.tokens += tokens
    st.events += events
    st.lat.append(time.perf_counter() - t0)
    if ttft is not None:
        st.ttft.append(ttft)
        st.itl.extend(gaps)


async def _clients(args, url: str, body: dict, c: int, start: float, progress) -> _Stats:
    """`c` closed-loop clients: warm-up from `start` (a `time.time()`), then `duration`
    measured seconds."""
    stream = not args.no_stream
    conn = aiohttp.TCPConnector(limit=c, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    await asyncio.sleep(max(0.0, start - time.time()))
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        stats: _Stats | None = None

        rng = random.Random() if args.distinct_prompts else None  # seeded from the OS

        async def client(deadline: float) -> None:
            while time.perf_counter() < deadline:
                sent = body if rng is None else _fresh(body, rng)
                await _one(session, url, sent, stream, stats)

        if args.warmup > 0:
            end = time.perf_counter() + args.warmup
            await asyncio.gather(*(client(end) for _ in range(c)))
        stats = _Stats()
        t0 = time.perf_counter()
        end = t0 + args.duration
        tasks = [asyncio.create_task(client(end)) for _ in range(c)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.2)
            if progress is not None:
                progress.n = round(min(time.perf_counter() - t0, args.duration), 1)
                progress.set_postfix(c=c, req=stats.requests, err=len(stats.errors))
        stats.elapsed = time.perf_counter() - t0
    return stats


def _fresh(body: dict, rng: random.Random) -> dict:
    """`body` with its prompt's words drawn afresh (as many as it has)."""
    if "prompt" in body:
        n = len(body["prompt"].split())
        return {**body, "prompt": " ".join(rng.choices(_WORDS, k=n))}
    n = len(body["messages"][0]["content"].split())
    return {**body, "messages": [{"role": "user", "content": " ".join(rng.choices(_WORDS, k=n))}]}


def _process_clients(window: dict, url: str, body: dict, c: int, start: float) -> _Stats:
    """One client process's share of a level (run in a spawned process)."""
    return asyncio.run(_clients(argparse.Namespace(**window), url, body, c, start, None))


async def _level(args, url: str, body: dict, c: int, progress) -> LevelResult:
    n = max(1, min(args.processes, c))
    if n == 1:
        stats = await _clients(args, url, body, c, time.time(), progress)
    else:  # one event loop cannot read every event of hundreds of fast streams
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        start = time.time() + 3.0  # every process has started by then
        shares = [c // n + (i < c % n) for i in range(n)]
        keys = ("duration", "warmup", "no_stream", "distinct_prompts")
        window = {k: getattr(args, k) for k in keys}
        with ProcessPoolExecutor(n, mp_context=ctx) as pool:
            parts = [
                loop.run_in_executor(pool, _process_clients, window, url, body, k, start)
                for k in shares
            ]
            stats = _Stats()
            for part in await asyncio.gather(*parts):
                stats.merge(part)
    elapsed = stats.elapsed
    return LevelResult(
        concurrency=c,
        requests=stats.requests,
        errors=len(stats.errors),
        duration_s=round(elapsed, 3),
        requests_per_s=round(stats.requests / elapsed, 2),
        output_tokens_per_s=round(stats.tokens / elapsed, 1),
        ttft_ms_p50=round(_pct(stats.ttft, 0.5), 3),
        ttft_ms_p99=round(_pct(stats.ttft, 0.99), 3),
        itl_ms_p50=round(_pct(stats.itl, 0.5), 3),
        itl_ms_p99=round(_pct(stats.itl, 0.99), 3),
        latency_ms_p50=round(_pct(stats.lat, 0.5), 3),
        latency_ms_p99=round(_pct(stats.lat, 0.99), 3),
        sse_events_per_req=round(stats.events / max(stats.requests, 1), 1),
        error_samples=sorted(set(stats.errors))[:3],
    )


async def _bench(args) -> list[LevelResult]:
    base = args.url.rstrip("/")
    model = args.model
    if model is None:
        async with aiohttp.ClientSession() as s, s.get(base + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
    prompt = " ".join(_WORDS[i % len(_WORDS)] for i in range(args.prompt_tokens))
    body: dict = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.top_p != 1.0:
        body["top_p"] = args.top_p
    if args.endpoint == "chat":
        url = base + "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        url = base + "/v1/completions"
        body["prompt"] = prompt
    if not args.no_stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    results = []
    for c in levels:
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(
                total=args.duration,
                desc=f"c={c}",
                unit="s",
                file=sys.stderr,
                bar_format="{desc} {bar} {n:.1f}/{total:.0f}s {postfix}",
            )
        try:
            results.append(await _level(args, url, body, c, progress))
        finally:
            if progress is not None:
                progress.close()
    return results


def run_bench(args) -> int:
    results = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        cols = {
            "concurrency": "conc",
            "requests": "requests",
            "errors": "errors",
            "requests_per_s": "req/s",
            "output_tokens_per_s": "out tok/s",
            "ttft_ms_p50": "TTFT p50 ms",
            "ttft_ms_p99": "TTFT p99 ms",
            "itl_ms_p50": "ITL p50 ms",
            "itl_ms_p99": "ITL p99 ms",
            "latency_ms_p50": "e2e p50 ms",
        }
        print(" ".join(f"{h:>12}" for h in cols.values()))
        for r in results:
            print(" ".join(f"{getattr(r, c):>12}" for c in cols))
            for e in r.error_samples:
                print(f"   error: {e}")
    return 1 if any(r.requests == 0 for r in results) else 0
