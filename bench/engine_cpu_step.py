"""The hf engine's CPU per step at many sequences, with the model's forward pass replaced by
an instant one: what the scheduler thread itself costs (planning, staging the inputs, taking
each sequence's token, handing tokens to the event loop), the part a GPU step cannot hide.

    python bench/engine_cpu_step.py                  # 256 sequences, 300 steps
    python bench/engine_cpu_step.py --seqs 64,256 --baseline-tree /tmp/old-segue

Each row: milliseconds per step (wall clock of the scheduler thread alone, torch on one
thread) and per sequence, with the garbage collector as it runs by default and after
`gc.freeze()` (what workers do once loaded). A random-weight Llama of one small layer is
built in a temporary directory; greedy requests of 100-token prompts, 1,500 tokens out, so
every step after the first decodes all of them.
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


def measure(model: str, seqs: int, steps: int, freeze: bool) -> float:
    """Seconds per step (run in a fresh process per case: see main)."""
    import torch

    from segue.engines.base import EngineInput
    from segue.engines.hf import HFConfig, HFEngine
    from segue.sampling import SamplingParams
    from segue.tokenizer import load_tokenizer

    torch.set_num_threads(1)  # the engine thread's own time, no helper threads

    async def go() -> float:
        cfg = HFConfig(model, max_num_seqs=seqs, kv_blocks=seqs * 110, device="cpu")
        if "overlap" in HFConfig.__dataclass_fields__:  # an older tree has no overlap
            cfg.overlap = "on"  # as on a GPU
        engine = HFEngine(cfg, load_tokenizer(model))
        engine._loop = asyncio.get_running_loop()
        engine._load()
        hidden = engine.paged.model.config.hidden_size
        engine.paged._forward = lambda tok, pos, slot, table: torch.zeros(
            tok.shape[0], tok.shape[1], hidden
        )
        sp = SamplingParams(ignore_eos=True)
        for i in range(seqs):
            engine.add_request(EngineInput(f"r{i}", list(range(10, 110)), 1500, sp))
        if freeze:
            gc.collect()
            gc.freeze()
        with torch.inference_mode():
            for _ in range(20):
                engine._step()
            start = time.perf_counter()
            for _ in range(steps):
                engine._step()
            return (time.perf_counter() - start) / steps

    return asyncio.run(go())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", default="256")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--baseline-tree", help="also measure the segue source in this directory")
    p.add_argument("--case", help=argparse.SUPPRESS)  # model,seqs,steps,freeze: one child
    args = p.parse_args()
    if args.case:
        model, seqs, steps, freeze = args.case.split(",")
        print(json.dumps(measure(model, int(seqs), int(steps), freeze == "1")))
        return
    trees = [("this tree", str(HERE.parent))]
    if args.baseline_tree:
        trees.append(("baseline", args.baseline_tree))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "model")
        subprocess.run(
            [sys.executable, "-m", "segue", "make-model", model, "--hidden-size", "64",
             "--layers", "1", "--heads", "2"],
            check=True, capture_output=True, cwd=HERE.parent,
        )  # fmt: skip
        print(f"{'tree':>10} {'seqs':>6} {'gc':>8} {'ms/step':>9} {'us/seq':>8}")
        for name, tree in trees:
            env = dict(os.environ, PYTHONPATH=tree)
            for seqs in map(int, args.seqs.split(",")):
                for freeze in (False, True):
                    case = f"{model},{seqs},{args.steps},{int(freeze)}"
                    out = subprocess.run(
                        [sys.executable, str(HERE / "engine_cpu_step.py"), "--case", case],
                        check=True, capture_output=True, text=True, env=env, cwd=tree,
                    )  # fmt: skip
                    s = json.loads(out.stdout.strip().splitlines()[-1])
                    how = "frozen" if freeze else "default"
                    print(f"{name:>10} {seqs:>6} {how:>8} {s * 1e3:>9.3f} {s / seqs * 1e6:>8.2f}")


if __name__ == "__main__":
    main()
