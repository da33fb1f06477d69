"""A GPU worker's CPU side on this machine: the hf engine's scheduler thread and the worker's
event loop, in one process as in a worker, serving closed-loop streams, with the GPU's work
emulated. Each decode step "takes" `--decode-ms` + `--per-row-us` per row, each prompt step
`--prefill-ms` + `--per-token-us` per token (defaults: the H200's 16-layer GQA model, bf16),
on a virtual GPU that runs behind the CPU as a real one does (the thread waits for a step's
tokens only when it reads them, releasing the GIL). The callers are the worker's own call
handlers (`EngineSessions.run`) writing to a mux connection whose socket is a no-op.

Prints output tokens/s, engine steps/s, the mean decode batch and TTFT p50/p90 (call start
to its first token frame queued) for three workers: prompt steps launched eagerly (the
scheduler thread spends `--eager-prefill-ms` of Python launching a 16-layer forward's kernels,
holding the GIL) with the GIL's default 5 ms switch interval, as before December 2026; the
same with the worker's interval (`segue.engines.hf.SWITCH_INTERVAL_S`); and prompt steps
replayed as graphs (no launch cost) with it, as now: where the worker, not the GPU, sets
the pace.

    python bench/worker_emulated.py                         # 256 streams, 128 tokens each
    python bench/worker_emulated.py --streams 64 --decode-ms 0 --per-row-us 0   # CPU ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class NullSocket:
    async def send_bytes(self, data: bytes) -> None:
        pass


class VirtualGPU:
    """Replaces the paged model's captured steps and token fetches: a step returns at once
    and makes the GPU busy for its time; reading a step's tokens waits for it."""

    def __init__(self, torch, paged, args) -> None:
        self.busy = 0.0
        self.ready = [0.0, 0.0]
        self.args = args
        logits = torch.zeros(2 * paged.prefill_base, paged.model.config.vocab_size)
        fetch, ids = paged.fetch_ids, paged.ids

        def run(seconds: float) -> None:
            self.busy = max(time.perf_counter(), self.busy) + seconds

        def decode_step(tok, pos, slot, src, table):
            run((args.decode_ms + args.per_row_us / 1e3 * tok.shape[0]) / 1e3)
            return logits[: tok.shape[0]]

        def prefill_step(tok, pos, slot, table, last):
            spin = time.perf_counter() + args.launch_ms / 1e3
            while time.perf_counter() < spin:  # Python launching kernels, with the GIL
                pass
            run((args.prefill_ms + args.per_token_us / 1e3 * tok.numel()) / 1e3)
            return logits[: tok.shape[0]]

        def fetch_ids() -> int:
            k = fetch()
            self.ready[k] = self.busy
            return k

        def read_ids(k: int) -> list[int]:
            wait = self.ready[k] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)  # as a CUDA event's synchronize: without the GIL
            return ids(k)

        paged._decode_step, paged._prefill_step = decode_step, prefill_step
        paged.fetch_ids, paged.ids = fetch_ids, read_ids


class TimedSink:
    """The mux sink of one call, noting when its first frame was queued."""

    def __init__(self, sink, starts: dict, firsts: dict) -> None:
        self.sink, self.starts, self.firsts = sink, starts, firsts
        self.key = sink.sid
        starts[self.key] = time.perf_counter()

    def __getattr__(self, name: str):
        return getattr(self.sink, name)

    def _first(self) -> None:
        if self.key not in self.firsts:
            self.firsts[self.key] = time.perf_counter()

    async def write(self, data: bytes) -> None:
        self._first()
        await self.sink.write(data)

    def write_now(self, data: bytes) -> None:
        self._first()
        self.sink.write_now(data)


async def serve(model: str, args) -> dict:
    import torch

    from segue.engines.base import EngineTask
    from segue.engines.hf import HFConfig, HFEngine
    from segue.mux import MuxSink, Outbox
    from segue.protocol import EngineRequest
    from segue.sampling import SamplingParams
    from segue.tokenizer import load_tokenizer
    from segue.worker.metrics import WorkerMetrics
    from segue.worker.session import EngineSessions

    torch.set_num_threads(1)
    cfg = HFConfig(model, max_num_seqs=args.streams, kv_blocks=args.streams * 20, device="cpu")
    cfg.overlap = "on"  # as on a GPU
    engine = HFEngine(cfg, load_tokenizer(model))
    await engine.start()
    sys.setswitchinterval(args.switch_interval)  # start() set the worker's: this case's
    engine.paged.bucket_steps(capture=False)  # the GPU's padded steps, fed from buffers
    VirtualGPU(torch, engine.paged, args)
    decodes = [0, 0]  # steps, rows
    decode = engine.paged.decode

    def counted(batch, src=None):
        decodes[0] += 1
        decodes[1] += len(batch)
        return decode(batch, src)

    engine.paged.decode = counted
    sessions = EngineSessions(engine, WorkerMetrics(engine), None, keepalive=30.0)  # type: ignore[arg-type]
    out = Outbox(NullSocket())  # type: ignore[arg-type]
    starts: dict = {}
    firsts: dict = {}
    sp = SamplingParams(ignore_eos=True)
    prompt = list(range(10, 10 + args.prompt_tokens))
    done = [0]
    sid = [0]
    stop_at = [0.0]
    measuring = [False]

    async def caller() -> None:
        while time.perf_counter() < stop_at[0]:
            sid[0] += 1
            rid = f"r{sid[0]}"
            sink = TimedSink(MuxSink(sid[0], out), starts, firsts)
            req = EngineRequest(request_id=rid, token_ids=prompt, max_tokens=args.max_tokens)
            req.sampling = sp
            await sessions.run(req, sink, EngineTask.GENERATE)  # type: ignore[arg-type]
            if measuring[0]:
                done[0] += 1

    gc.collect()
    gc.freeze()
    stop_at[0] = time.perf_counter() + args.warmup + args.duration
    tasks = [asyncio.create_task(caller()) for _ in range(args.streams)]
    await asyncio.sleep(args.warmup)
    measuring[0] = True
    first_sid, steps0, rows0 = sid[0], decodes[0], decodes[1]
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    elapsed = time.perf_counter() - t0
    steps, rows = decodes[0] - steps0, decodes[1] - rows0
    ttft = sorted(firsts[k] - starts[k] for k in firsts if k > first_sid and k in starts)
    await asyncio.gather(*tasks)
    await engine.stop()

    def pct(p: float) -> float:
        return ttft[int(p * (len(ttft) - 1))] * 1e3 if ttft else float("nan")

    return {
        "tokens_per_s": done[0] * args.max_tokens / elapsed,
        "decode_steps_per_s": steps / elapsed,
        "mean_batch": rows / max(steps, 1),
        "ttft_ms_p50": pct(0.5),
        "ttft_ms_p90": pct(0.9),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=100)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--decode-ms", type=float, default=0.95, help="a decode step's fixed time")
    p.add_argument("--per-row-us", type=float, default=3.4, help="and per row")
    p.add_argument("--prefill-ms", type=float, default=0.9, help="a prompt step's fixed time")
    p.add_argument("--per-token-us", type=float, default=6.0, help="and per (padded) token")
    p.add_argument(
        "--eager-prefill-ms", type=float, default=2.0, help="CPU to launch an eager prompt step"
    )
    p.add_argument("--switch-interval", type=float, help=argparse.SUPPRESS)  # one case
    p.add_argument("--launch-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.switch_interval is not None:
        import uvloop

        print(json.dumps(uvloop.run(serve(args.model, args))))
        return
    from segue.engines.hf import SWITCH_INTERVAL_S

    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        subprocess.run(
            [sys.executable, "-m", "segue", "make-model", model, "--hidden-size", "64",
             "--layers", "1", "--heads", "2"],
            check=True, capture_output=True, cwd=HERE.parent,
        )  # fmt: skip
        head = ("prompt steps", "GIL switch", "tok/s", "steps/s", "batch", "TTFT p50", "p90")
        print("{:>13} {:>11} {:>9} {:>8} {:>6} {:>9} {:>7}".format(*head))
        cases = [
            ("eager", 0.005, args.eager_prefill_ms),
            ("eager", SWITCH_INTERVAL_S, args.eager_prefill_ms),
            ("graphs", SWITCH_INTERVAL_S, 0.0),
        ]
        for how, interval, launch in cases:
            argv = [sys.executable, __file__, "--model", model, "--switch-interval", str(interval)]
            argv += ["--launch-ms", str(launch), *sys.argv[1:]]
            res = subprocess.run(argv, check=True, capture_output=True, text=True, env=os.environ)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"{how:>13} {interval * 1e3:>9.1f}ms {r['tokens_per_s']:>9.0f}"
                f" {r['decode_steps_per_s']:>8.0f} {r['mean_batch']:>6.1f}"
                f" {r['ttft_ms_p50']:>8.1f}ms {r['ttft_ms_p90']:>6.1f}ms"
            )


if __name__ == "__main__":
    main()
