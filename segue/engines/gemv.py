"""Matrix-vector products for decode steps of one token (Triton kernels), where cuBLAS's
choice for a single row leaves bandwidth unused.

At batch 1 a decode step reads each weight once and computes almost nothing: the time is
how fast the weight streams from HBM. Here one program computes one output: it streams that
output's weight row once in BLOCK_K chunks and keeps BLOCK_K partial sums in registers,
summed once at the end; thousands of programs in flight keep HBM busy. Which is faster
depends on the GPU (`bench/gemv.py`, Llama-3.2-1B's projections): on an H100 this kernel
beat cuBLAS on all five (q/k/v 5.73 against 6.90 us, down 12.84 against 15.42, a 128k
output layer 167 against 188); on an H200 only on the small ones (o 4.46 against 5.95,
q/k/v 5.76 against 6.03; gate/up 22.2 against 18.0). So the small ones run here
(`MAX_WEIGHTS`), the large ones through cuBLAS. The output layer's logits come out in fp32
directly (no cast kernel after).

Accumulation is fp32; results equal cuBLAS's up to summation order. On CPU the tests run
the kernel through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

# weights (elements) up to which a one-row product runs here: the shapes faster on both GPUs
MAX_WEIGHTS = 8 << 20


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


def serves(x: Any, w: Any) -> bool:
    """Whether x @ w.T runs here: one row, and a weight small enough that cuBLAS is slower."""
    return x.numel() == x.shape[-1] and w.numel() <= MAX_WEIGHTS


def product(x: Any, w: Any, bias: Any | None = None, out_dtype: Any = None) -> Any:
    """x @ w.T (+ bias) in `out_dtype` (x's by default): here where `serves`, else cuBLAS's."""
    if serves(x, w):
        return linear(x, w, bias, out_dtype)
    y = torch.nn.functional.linear(x, w, bias)
    return y if out_dtype is None else y.to(out_dtype)


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
