"""Matrix-vector products for decode steps of a few rows, with the element-wise work that
feeds them folded in (Triton kernels): the residual add and RMSNorm before a projection
(q/k/v, gate/up), and SiLU(gate) * up before the down projection.

At batch 1 a layer costs its weights read once plus a gap per kernel, and the element-wise
kernels around the products move a few kilobytes each: folding them into the products takes
three of a decode layer's ten kernels away. A program computes BLOCK_N outputs of every row,
reading its weight rows once in tiles along K (the rows, at most 16, padded to one
tensor-core product); a normalising program first sums the squares of its rows (each
program does so: a few kilobytes from cache) and the first program writes the residual sum.

Each rounds where `fused_ops` and transformers' modules round (the residual sum and the
normalised value in the model's dtype before the norm weight, SiLU's result before the
product), so results equal the unfused path's up to summation order. On CPU the tests run
them through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows a product pads to (tl.dot's least)


@triton.jit
def _residual(h_ptr, x_ptr, r, k, m, K: tl.constexpr, HAS_ADD: tl.constexpr):
    """A [rows, BLOCK_K] tile of h (+ x, rounded to h's dtype)."""
    h = tl.load(h_ptr + r[:, None] * K + k[None, :], mask=m, other=0.0)
    if HAS_ADD:
        x = tl.load(x_ptr + r[:, None] * K + k[None, :], mask=m, other=0.0)
        h = (h.to(tl.float32) + x.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def _product(acc, a, w_ptr, n, k, nlive, klive, K: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ w[n, k].T: a [rows, BLOCK_K] in the weight's dtype."""
    live = nlive[:, None] & klive[None, :]
    w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=live, other=0.0)
    if IEEE:
        return acc + tl.dot(a, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(a, tl.trans(w))


@triton.jit
def _norm_gemv_kernel(
    h_ptr,  # [B, K] the residual stream
    x_ptr,  # [B, K] added to it first (HAS_ADD)
    nw_ptr,  # [K] the norm's weight
    w_ptr,  # [N, K] the projection's weight
    y_ptr,  # [B, N] out
    s_ptr,  # [B, K] out: h + x (HAS_ADD)
    eps,
    B,
    N,
    K: tl.constexpr,
    HAS_ADD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    rlive = r < B
    nlive = n < N
    ss = tl.zeros([ROWS], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        m = rlive[:, None] & (k < K)[None, :]
        h = _residual(h_ptr, x_ptr, r, k, m, K, HAS_ADD)
        if HAS_ADD:
            if pid == 0:  # one program writes the residual stream's sum
                tl.store(s_ptr + r[:, None] * K + k[None, :], h, mask=m)
        hf = h.to(tl.float32)
        ss += tl.sum(hf * hf, axis=1)
    rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        klive = k < K
        h = _residual(h_ptr, x_ptr, r, k, rlive[:, None] & klive[None, :], K, HAS_ADD)
        nw = tl.load(nw_ptr + k, mask=klive, other=0.0).to(tl.float32)
        xn = (h.to(tl.float32) * rstd[:, None]).to(h.dtype).to(tl.float32) * nw[None, :]
        acc = _product(acc, xn.to(w_ptr.dtype.element_ty), w_ptr, n, k, nlive, klive, K, IEEE)
    out = rlive[:, None] & nlive[None, :]
    tl.store(y_ptr + r[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


@triton.jit
def _silu_gemv_kernel(
    gu_ptr,  # [B, 2 K]: gate, then up
    w_ptr,  # [N, K]
    y_ptr,  # [B, N] out
    B,
    N,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    rlive = r < B
    nlive = n < N
    acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        klive = k < K
        m = rlive[:, None] & klive[None, :]
        g = tl.load(gu_ptr + r[:, None] * 2 * K + k[None, :], mask=m, other=0.0)
        u = tl.load(gu_ptr + r[:, None] * 2 * K + K + k[None, :], mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        a = (act * u.to(tl.float32)).to(w_ptr.dtype.element_ty)
        acc = _product(acc, a, w_ptr, n, k, nlive, klive, K, IEEE)
    out = rlive[:, None] & nlive[None, :]
    tl.store(y_ptr + r[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out)


def _blocks(n: int, k: int) -> tuple[int, int]:
    """(outputs per program: a few programs per SM of a large GPU; weights per row and
    tile: 16 KiB of bf16 a load, enough in flight to keep HBM busy)."""
    return (16 if n <= 8192 else 32), min(512, triton.next_power_of_2(k))


def norm_gemv(h: Any, x: Any | None, norm_w: Any, eps: float, w: Any) -> tuple[Any, Any]:
    """h, x [B, K] (B <= 16, contiguous); norm_w [K]; w [N, K]. With s = h + x (h when x is
    None): returns (RMSNorm(s) * norm_w @ w.T [B, N], s)."""
    b, k = h.shape
    n = w.shape[0]
    y = torch.empty(b, n, dtype=h.dtype, device=h.device)
    s = torch.empty_like(h) if x is not None else h
    bn, bk = _blocks(n, k)
    _norm_gemv_kernel[(triton.cdiv(n, bn),)](
        h, h if x is None else x, norm_w, w, y, s, eps, b, n,
        K=k, HAS_ADD=x is not None, BLOCK_N=bn, BLOCK_K=bk, ROWS=MAX_ROWS,
        IEEE=w.dtype == torch.float32,
    )  # fmt: skip
    return y, s


def silu_gemv(gu: Any, w: Any) -> Any:
    """gu [B, 2 K] (gate then up, B <= 16, contiguous); w [N, K]. Returns (SiLU(gate) * up)
    @ w.T, [B, N]."""
    b = gu.shape[0]
    n, k = w.shape
    y = torch.empty(b, n, dtype=gu.dtype, device=gu.device)
    bn, bk = _blocks(n, k)
    _silu_gemv_kernel[(triton.cdiv(n, bn),)](
        gu, w, y, b, n, K=k, BLOCK_N=bn, BLOCK_K=bk, ROWS=MAX_ROWS,
        IEEE=w.dtype == torch.float32,
    )  # fmt: skip
    return y
