"""KV-aware routing on a multi-turn workload, against round-robin and least-loaded.

Conversations each with a long document of their own run side by side (starting a little
apart, with a random pause between turns, the same for every policy); every turn re-sends the
whole conversation (document, earlier questions and answers) plus a new question, and streams
the answer. 4 mocker workers with a KV cache too small to hold every conversation on
every worker. Printed per policy: TTFT p50/p90/p99, end-to-end p50/p90, requests/s, and the
share of prompt tokens the workers found cached (from `usage.prompt_tokens_details`).

    python bench/kv_routing.py                        # each conversation its own document
    python bench/kv_routing.py --system-words 800     # plus a system prompt they all share
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import tempfile
import time

import aiohttp
from _common import free_port, spawn, stop, wait_workers

from segue.tokenizer import BuiltinTokenizer

_tok = BuiltinTokenizer()
VOCAB = [_tok.decode([i]).strip() for i in _tok.output_vocab()]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 1) if xs else 0.0


async def turn(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> tuple[float, float, str, int, int]:
    """One streamed completion: TTFT, end-to-end, text, prompt tokens, cached tokens."""
    body = {
        "model": "segue-mocker",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = 0.0
    text: list[str] = []
    usage: dict = {}
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            ev = json.loads(line[6:])
            if ev.get("choices"):
                if not ttft:
                    ttft = time.perf_counter() - t0
                text.append(ev["choices"][0]["text"])
            if ev.get("usage"):
                usage = ev["usage"]
    details = usage.get("prompt_tokens_details") or {}
    return (
        ttft,
        time.perf_counter() - t0,
        "".join(text),
        usage.get("prompt_tokens", 0),
        details.get("cached_tokens", 0),
    )


def words(seed: object, n: int) -> str:
    """`n` words of the built-in tokenizer (one token each), a sequence of its own per seed."""
    rng = random.Random(str(seed))
    return " ".join(rng.choice(VOCAB) for _ in range(n))


async def workload(url: str, a: argparse.Namespace) -> dict:
    system = words("system", a.system_words)
    ttfts: list[float] = []
    later: list[float] = []  # TTFT of turns after the first (the first is cold everywhere)
    e2es: list[float] = []
    prompt_tokens = cached_tokens = 0

    async def conversation(c: int) -> None:
        nonlocal prompt_tokens, cached_tokens
        history = f"{system} {words(('doc', c), a.doc_words)}"
        rng = random.Random(c)  # the same arrivals for every policy
        await asyncio.sleep(c * a.stagger_s)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            for t in range(a.turns):
                if t:
                    await asyncio.sleep(rng.uniform(0, 2 * a.think_s))  # the user reads
                question = words(("question", c, t), a.new_words)
                prompt = f"{history} {question}"
                ttft, e2e, answer, n, hit = await turn(s, url, prompt, a.max_tokens)
                ttfts.append(ttft)
                if t:
                    later.append(ttft)
                e2es.append(e2e)
                prompt_tokens += n
                cached_tokens += hit
                history = f"{prompt} {answer}"

    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(c) for c in range(a.conversations)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(e2es),
        "requests_per_s": round(len(e2es) / wall, 2),
        "ttft_ms_p50": pct(ttfts, 50),
        "ttft_ms_p90": pct(ttfts, 90),
        "ttft_ms_p99": pct(ttfts, 99),
        "later_turns_ttft_ms_p50": pct(later, 50),
        "later_turns_ttft_ms_p90": pct(later, 90),
        "e2e_ms_p50": pct(e2es, 50),
        "e2e_ms_p90": pct(e2es, 90),
        "e2e_ms_mean": round(statistics.mean(e2es) * 1000, 1),
        "cached_ratio": round(cached_tokens / max(prompt_tokens, 1), 3),
        "prompt_tokens_mean": round(prompt_tokens / max(len(e2es), 1)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="round-robin,least-loaded,kv")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kv-load-weight", type=float, help="the frontend's, for --router kv")
    ap.add_argument("--kv-overlap-weight", type=float, help="the frontend's, for --router kv")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--doc-words", type=int, default=2000, help="each conversation's document")
    ap.add_argument("--system-words", type=int, default=0, help="a prefix all conversations share")
    ap.add_argument("--new-words", type=int, default=60, help="words of each new question")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--think-s", type=float, default=0.5, help="mean pause between turns")
    ap.add_argument("--stagger-s", type=float, default=0.1, help="between conversation starts")
    ap.add_argument("--kv-blocks", type=int, default=512, help="per worker")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--prefill-tps", type=float, default=20000.0)
    ap.add_argument("--step-ms", type=float, default=5.0)
    a = ap.parse_args()
    mocker = [
        "--mocker-kv-blocks",
        str(a.kv_blocks),
        "--mocker-block-size",
        str(a.block_size),
        "--mocker-prefill-tps",
        str(a.prefill_tps),
        "--mocker-step-ms",
        str(a.step_ms),
    ]
    print(json.dumps({"workload": {k: v for k, v in vars(a).items() if k != "policies"}}))
    for policy in a.policies.split(","):
        tmp = tempfile.mkdtemp(prefix="segue-bench-kv-")
        port = free_port()
        with open(os.path.join(tmp, "procs.log"), "w") as log:
            disc = ["--discovery", f"file:{tmp}"]
            procs = [
                spawn(["--log-level", "WARNING", "worker", *disc, *mocker], log)
                for _ in range(a.workers)
            ]
            fe_args = ["frontend", *disc, "--port", str(port), "--router", policy]
            for flag in ("kv_load_weight", "kv_overlap_weight"):
                if policy == "kv" and getattr(a, flag) is not None:
                    fe_args += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
            procs.append(spawn(["--log-level", "WARNING", *fe_args], log))
            url = f"http://127.0.0.1:{port}"
            try:
                wait_workers(url, a.workers)
                print(json.dumps({"router": policy, **asyncio.run(workload(url, a))}), flush=True)
            finally:
                stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
