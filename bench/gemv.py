"""A one-token decode step's matrix products on a GPU: cuBLAS (what
`torch.nn.functional.linear` runs) against segue's Triton matrix-vector product
(`segue/engines/gemv.py`). Each is timed as calls in one captured CUDA graph, every call
reading its own copy of the weight (so from HBM, not from L2): the GPU's time per call.

    python bench/gemv.py                          # Llama-3.2-1B's projections, bf16
    python bench/gemv.py --shapes 3072x2048,2048x2048

A shape is NxK: the weight is [N, K] (a linear layer's out x in), the input [1, K]. The
engine uses the Triton product only below `gemv.MAX_WEIGHTS` elements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_step import copy_bandwidth, replay_ms  # noqa: E402

# q/k/v, o, gate/up, down, a 128k vocabulary's output layer
SHAPES = "3072x2048,2048x2048,16384x2048,2048x8192,128256x2048"


def graph_us(torch: Any, fn: Any, calls: int, replays: int = 20) -> float:
    """fn(i) for i in range(calls) captured in one graph: GPU microseconds a call."""
    for i in range(calls):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    return 1000 * replay_ms(torch, g, replays) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES)
    a = p.parse_args()
    import torch

    from segue.engines import gemv

    bw = copy_bandwidth(torch)
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s")
    print(f"{'shape':>12} {'floor us':>9} {'cuBLAS us':>10} {'triton us':>10}")
    linear = torch.nn.functional.linear
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        copies = max(4, -(-(512 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        diff = (gemv.linear(x, ws[0]).float() - linear(x, ws[0]).float()).abs().max().item()
        floor = 1e6 * n * k * 2 / bw
        cublas = graph_us(torch, lambda i: linear(x, ws[i]), copies)  # noqa: B023
        ours = graph_us(torch, lambda i: gemv.linear(x, ws[i]), copies)  # noqa: B023
        print(f"{shape:>12} {floor:9.2f} {cublas:10.2f} {ours:10.2f}   max |diff| {diff:.3f}")
        ws.clear()


if __name__ == "__main__":
    main()
