"""A worker's event loop delivering an engine's steps to its callers, in process: per step
every one of `--streams` requests gets one token (as the hf engine hands them over, one
call from its thread per step), and each call's frame goes out on a mux connection whose
socket is a no-op. Prints the loop's CPU per step and per token; what it costs is what a
GPU worker's loop takes from its engine thread (they share the GIL).

    python bench/worker_delivery.py                    # 256 streams, 400 steps
    python bench/worker_delivery.py --baseline-tree /tmp/old-segue
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NullSocket:
    """What the Outbox sends on: counts bytes, sends nothing."""

    def __init__(self) -> None:
        self.bytes = 0

    async def send_bytes(self, data: bytes) -> None:
        self.bytes += len(data)


class StepEngine:
    """An engine whose requests only move when `step` is called."""

    def __init__(self) -> None:
        from segue.engines.base import RequestStream

        self.stream_type = RequestStream
        self.streams: list = []

    async def prepare(self, inp) -> None:
        pass

    def add_request(self, inp):
        s = self.stream_type(inp.request_id)
        self.streams.append(s)
        return s

    def abort(self, rid: str) -> bool:
        return False


async def measure(streams: int, steps: int) -> tuple[float, int]:
    from segue.engines.base import EngineFinish, EngineTask
    from segue.engines.loop_bridge import deliver
    from segue.mux import MuxSink, Outbox
    from segue.protocol import EngineRequest
    from segue.worker.metrics import WorkerMetrics
    from segue.worker.session import EngineSessions

    engine = StepEngine()
    sessions = EngineSessions(engine, WorkerMetrics(engine), None, keepalive=30.0)  # type: ignore[arg-type]
    sock = NullSocket()
    out = Outbox(sock)  # type: ignore[arg-type]
    calls = [
        asyncio.create_task(
            sessions.run(
                EngineRequest(request_id=f"r{i}", token_ids=[1, 2, 3], max_tokens=10**6),
                MuxSink(i, out),
                EngineTask.GENERATE,
            )
        )
        for i in range(streams)
    ]
    while len(engine.streams) < streams:
        await asyncio.sleep(0)

    async def settle() -> None:
        for _ in range(4):  # the woken calls, then the outbox's writer
            await asyncio.sleep(0)

    gc.collect()
    gc.freeze()
    for _ in range(20):
        deliver([(s, 7, None) for s in engine.streams])
        await settle()
    start, sent = time.process_time(), sock.bytes
    for _ in range(steps):
        deliver([(s, 7, None) for s in engine.streams])
        await settle()
    cpu = (time.process_time() - start) / steps
    for s in engine.streams:
        s.finish(EngineFinish.LENGTH)
    await asyncio.gather(*calls)
    return cpu, (sock.bytes - sent) // steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--baseline-tree", help="also measure the segue source in this directory")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        import uvloop

        cpu, nbytes = uvloop.run(measure(args.streams, args.steps))
        print(json.dumps([cpu, nbytes]))
        return
    trees = [("this tree", str(HERE.parent))]
    if args.baseline_tree:
        trees.append(("baseline", args.baseline_tree))
    print(f"{'tree':>10} {'streams':>8} {'ms/step':>9} {'us/token':>9} {'bytes/step':>11}")
    for name, tree in trees:
        argv = [sys.executable, str(HERE / "worker_delivery.py"), "--case"]
        argv += ["--streams", str(args.streams), "--steps", str(args.steps)]
        env = dict(os.environ, PYTHONPATH=tree)
        res = subprocess.run(argv, check=True, capture_output=True, text=True, env=env, cwd=tree)
        cpu, nbytes = json.loads(res.stdout.strip().splitlines()[-1])
        per = cpu / args.streams * 1e6
        print(f"{name:>10} {args.streams:>8} {cpu * 1e3:>9.3f} {per:>9.2f} {nbytes:>11}")


if __name__ == "__main__":
    main()
