"""What `--router kv` costs the frontend per request, with 10,000 and 1,000,000 blocks in its
KV index: time of one pick (hashing the prompt and matching it against the index), time to
apply one batch of events, and the index's memory.

    python bench/kv_router_cost.py
"""

from __future__ import annotations

import argparse
import json
import random
import time
import tracemalloc

from segue.blocks import block_hashes
from segue.discovery import Instance
from segue.protocol import KvEvents, KvSnapshot, Role
from segue.router import Policy, Router


def build(router: Router, workers: int, blocks: int, block_size: int, prompt: list[int]) -> None:
    """`blocks` cached blocks in all, spread over `workers`: conversations of 32 blocks each,
    the first worker also holding the measured prompt."""
    rng = random.Random(0)
    per = blocks // workers
    for w in range(workers):
        hashes: list[int] = []
        while len(hashes) < per:
            doc = [rng.randrange(50000) for _ in range(32 * block_size)]
            hashes += block_hashes(doc, block_size)
        if w == 0:
            hashes[: len(prompt) // block_size] = block_hashes(prompt, block_size)
        snap = KvSnapshot(seq=0, block_size=block_size, capacity=2 * per, blocks=hashes[:per])
        router.kv_index.snapshot(f"w{w}", snap)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--picks", type=int, default=2000)
    a = ap.parse_args()
    prompt = [random.Random(1).randrange(50000) for _ in range(a.prompt_tokens)]
    for size in (int(s) for s in a.sizes.split(",")):
        router = Router(Policy.KV)
        router.update(
            {
                f"w{w}": Instance(id=f"w{w}", role=Role.AGGREGATED, url="", pid=0, host="h")
                for w in range(a.workers)
            }
        )
        tracemalloc.start()
        build(router, a.workers, size, a.block_size, prompt)
        memory = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        t0 = time.perf_counter()
        for _ in range(a.picks):
            picked = router.pick([Role.AGGREGATED], tokens=prompt)
        pick_us = (time.perf_counter() - t0) / a.picks * 1e6
        assert picked is not None and picked.id == "w0"
        t0 = time.perf_counter()
        for i in range(a.picks):  # 16 blocks stored, 16 removed per batch
            batch = [random.getrandbits(64) for _ in range(16)]
            router.kv_index.apply("w1", KvEvents(seq=2 * i + 1, stored=batch))
            router.kv_index.apply("w1", KvEvents(seq=2 * i + 2, removed=batch))
        event_us = (time.perf_counter() - t0) / (2 * a.picks) * 1e6
        t0 = time.perf_counter()
        for _ in range(a.picks):
            block_hashes(prompt, a.block_size)
        hash_us = (time.perf_counter() - t0) / a.picks * 1e6
        print(
            json.dumps(
                {
                    "indexed_blocks": router.kv_index.size,
                    "workers": a.workers,
                    "prompt_tokens": a.prompt_tokens,
                    "block_size": a.block_size,
                    "pick_us": round(pick_us, 1),
                    "of_which_hashing_us": round(hash_us, 1),
                    "event_batch_us": round(event_us, 1),
                    "index_mib": round(memory / 2**20, 1),
                    "bytes_per_block": round(memory / max(router.kv_index.size, 1)),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
