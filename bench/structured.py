"""What constrained decoding costs, side by side in one run: engine tokens/s and time to
first token with and without a JSON schema (mocker, and hf on a tiny random Llama on CPU) at
concurrency 1 and 16; a grammar's first compile against a cache hit; the per-step mask cost
(fill + apply for a batch).

    python bench/structured.py [--engines mocker,hf] [--requests 48]

Needs segue[structured] (and segue[hf] for the hf rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from segue.engines.base import EngineInput
from segue.grammar import Grammars
from segue.sampling import Constraint, ConstraintKind, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "depth": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 6},
    },
    "required": ["name", "depth", "tags"],
}


async def drive(engine, prompts: list[list[int]], sp: SamplingParams, conc: int, n: int):
    """Runs every prompt (max n tokens), `conc` at a time; tokens/s and TTFTs."""
    sem = asyncio.Semaphore(conc)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int, ids: list[int]) -> None:
        nonlocal tokens
        async with sem:
            inp = EngineInput(f"r{i}", ids, n, sp)
            t0 = time.perf_counter()
            await engine.prepare(inp)
            stream = engine.add_request(inp)
            first = True
            while True:
                o = await stream.get(60)
                assert o is not None
                if o.token_ids and first:
                    ttfts.append(time.perf_counter() - t0)
                    first = False
                tokens += len(o.token_ids)
                if o.finish_reason is not None:
                    return

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return tokens / (time.perf_counter() - t0), statistics.median(ttfts)


def engines(names: list[str]):
    from segue.tokenizer import BuiltinTokenizer

    if "mocker" in names:
        from segue.engines.mocker import MockerConfig, MockerEngine

        tok = BuiltinTokenizer()
        yield "mocker", MockerEngine(MockerConfig(speedup=1e6, max_num_seqs=64), tok), tok
    if "hf" in names:
        from segue.engines.hf import HFConfig, HFEngine
        from segue.models.tiny import build_tiny_llama
        from segue.tokenizer import HFTokenizer

        d = str(build_tiny_llama(tempfile.mkdtemp(prefix="segue-bench-structured-"), seed=1))
        tok = HFTokenizer(d)
        cfg = HFConfig(model_dir=d, device="cpu", max_num_seqs=16, kv_blocks=2048)
        yield "hf", HFEngine(cfg, tok), tok


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="mocker,hf")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    c = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    for name, engine, tok in engines(a.engines.split(",")):
        await engine.start()
        try:
            prompts = [tok.encode(f"report number {i} of the station") for i in range(a.requests)]
            # the process's first constrained request imports xgrammar (and torch): once
            t0 = time.perf_counter()
            await drive(engine, prompts[:1], SamplingParams(constraint=c), 1, a.max_tokens)
            print(
                json.dumps({"engine": name, "first_request_s": round(time.perf_counter() - t0, 2)}),
                flush=True,
            )
            for conc in (1, 16):
                row = {"engine": name, "concurrency": conc}
                for label, sp in (
                    ("plain", SamplingParams(ignore_eos=True)),
                    ("schema", SamplingParams(constraint=c)),
                ):
                    tps, ttft = await drive(engine, prompts, sp, conc, a.max_tokens)
                    row[f"{label}_tokens_per_s"] = round(tps, 1)
                    row[f"{label}_ttft_ms_p50"] = round(ttft * 1000, 2)
                print(json.dumps(row), flush=True)
        finally:
            await engine.stop()
        # compile: a new schema each time (first request) against the cached one
        g = Grammars(tok)
        t0 = time.perf_counter()
        g.compile(c)  # also builds the vocabulary's tokenizer info, once per worker
        setup = time.perf_counter() - t0
        firsts = []
        for i in range(10):
            fresh = dict(SCHEMA, title=f"s{i}")
            t0 = time.perf_counter()
            g.compile(Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(fresh)))
            firsts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(1000):
            g.compile(c)
        hit = (time.perf_counter() - t0) / 1000
        # mask: one step of a batch of 16 constrained rows
        import torch

        from segue.engines.constrained import mask_logits

        vocab = tok.vocab_size
        matchers = [g.matcher(c, []) for _ in range(16)]
        logits = torch.zeros(16, vocab)
        t0 = time.perf_counter()
        for _ in range(200):
            mask_logits(logits, list(enumerate(matchers)))
        mask = (time.perf_counter() - t0) / 200
        print(
            json.dumps(
                {
                    "engine": name,
                    "vocab": vocab,
                    "first_compile_with_vocab_ms": round(setup * 1000, 2),
                    "new_schema_compile_ms_p50": round(statistics.median(firsts) * 1000, 2),
                    "cache_hit_us": round(hit * 1e6, 2),
                    "mask_batch16_ms": round(mask * 1000, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
