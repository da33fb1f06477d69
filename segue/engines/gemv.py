"""Matrix-vector products for decode steps of one token (Triton kernels), where cuBLAS's
choice for a single row leaves bandwidth unused.

At batch 1 a decode step reads each weight once and computes almost nothing: the time is
how fast the weight streams from HBM. Here one program computes one output: it streams that
output's weight row once in BLOCK_K chunks and keeps BLOCK_K partial sums in registers,
summed once at the end; thousands of programs in flight keep HBM busy. Which is faster
depends on the GPU (`bench/gemv.py`, Llama-3.2-1B's projections): on an H100 this kernel
beat cuBLAS on all five (q/k/v 5.73 against 6.90 us, down 12.84 against 15.42, a 128k
output layer 167 against 188); on an H200 only on the small ones (o 4.46 against 5.95,
q/k/v 5.76 against 6.03; gate/up 22.2 against 18.0). So a model times both for each of
its weight shapes when it loads (`faster_shapes`) and keeps the faster. The output layer's
logits come out in fp32 directly (no cast kernel after).

Accumulation is fp32; results equal cuBLAS's up to summation order. On CPU the tests run
the kernel through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

Shape = tuple[int, int]


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] (HAS_BIAS)
    y_ptr,  # [N] out
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    nlive = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        klive = k < K
        x = tl.load(x_ptr + k, mask=klive, other=0.0).to(tl.float32)
        wm = nlive[:, None] & klive[None, :]
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=wm, other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=nlive, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=nlive)


def serves(x: Any, w: Any, shapes: set[Shape]) -> bool:
    """Whether x @ w.T runs here: one row, and a weight of a shape `faster_shapes` chose."""
    return x.numel() == x.shape[-1] and tuple(w.shape) in shapes


def faster_shapes(weights: list[Any]) -> set[Shape]:
    """The weight shapes whose one-row product is faster here than cuBLAS's on this GPU:
    each shape's weights (a model's layers, so each is read from HBM, not from L2) run
    through both in a captured graph, twice over, timed by CUDA events. On CPU (Triton's
    interpreter: the tests) every shape, so the tests cover the kernel."""
    groups: dict[Shape, list[Any]] = {}
    for w in weights:
        groups.setdefault((w.shape[0], w.shape[1]), []).append(w)
    if not weights or not weights[0].is_cuda:
        return set(groups)
    lin = torch.nn.functional.linear
    faster = set()
    for shape, ws in groups.items():
        x = torch.zeros(1, shape[1], dtype=ws[0].dtype, device=ws[0].device)
        ours = _graph_ms(lambda w, x=x: linear(x, w), ws)
        if ours < _graph_ms(lambda w, x=x: lin(x, w), ws):
            faster.add(shape)
    return faster


def _graph_ms(fn: Any, ws: list[Any]) -> float:
    for w in ws:  # compiles, and lets cuBLAS pick its kernel, outside the capture
        fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(2):
            for w in ws:
                fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


def linear(x: Any, w: Any, bias: Any | None = None, out_dtype: Any = None) -> Any:
    """x [..., K] (one row), w [N, K] contiguous: x @ w.T (+ bias), [..., N], in
    `out_dtype` (x's by default)."""
    k = x.shape[-1]
    n = w.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=out_dtype or x.dtype, device=x.device)
    # one output a program on a GPU (the fastest of a sweep on an H100); Triton's
    # interpreter on CPU runs programs one by one in Python, so there one takes many
    block_n = 1 if x.is_cuda else 64
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x.contiguous(), w, w if bias is None else bias, y, n,
        K=k, BLOCK_N=block_n, BLOCK_K=min(1024 // block_n, triton.next_power_of_2(k)),
        HAS_BIAS=bias is not None, num_warps=4 if k <= 4096 else 8,
    )  # fmt: skip
    return y
