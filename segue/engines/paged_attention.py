"""Decode attention that reads the paged KV pool in place (a Triton kernel).

One query token per sequence attends to its positions [0, length) through its block table:
no sequence's KV is copied into a padded rectangle first (what the SDPA path of `paged.py`
does), so a step reads each live block once. One program per (sequence, KV head) serves
the query heads of that group (grouped-query attention), walking the sequence's blocks with
an online softmax in fp32. The loop bound is read from the lengths tensor on the GPU, so a
captured CUDA graph replays it for any lengths within its bucket.

On CPU the tests run the same kernel through Triton's interpreter (TRITON_INTERPRET=1,
set before this module is imported) and compare it with SDPA over the gathered blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, NH, D]
    k_ptr,  # [blocks, BS, KVH, D]
    v_ptr,
    table_ptr,  # [B, NB] block ids
    lens_ptr,  # [B] positions each query sees
    out_ptr,  # [B, NH, D]
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    BS: tl.constexpr,
    D: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D)
    s = tl.arange(0, BS)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None],
        other=0.0,
    ).to(tl.float32)
    q = q * scale
    n = tl.load(lens_ptr + b)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    for j in range(0, tl.cdiv(n, BS)):
        block = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
        offs = block * stride_kb + s[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs).to(tl.float32)  # [BS, D]
        v = tl.load(v_ptr + offs).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BS]
        scores = tl.where((j * BS + s)[None, :] < n, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=gmask[:, None],
    )


def decode_attention(
    q: Any, k_pool: Any, v_pool: Any, table: Any, lens: Any, scale: float | None = None
) -> Any:
    """q [B, NH, D]; k_pool, v_pool [blocks, BS, KVH, D]; table [B, NB] (int); lens [B]:
    the positions each query attends to. Returns [B, NH, D] in q's dtype. Block and head
    sizes are powers of two (Triton's ranges)."""
    b, nh, d = q.shape
    bs, kvh = k_pool.shape[1], k_pool.shape[2]
    group = nh // kvh
    assert v_pool.stride() == k_pool.stride()  # one set of strides for both pools
    q = q.contiguous()
    out = torch.empty_like(q)
    _decode_kernel[(b, kvh)](
        q, k_pool, v_pool, table, lens, out,
        scale if scale is not None else d**-0.5,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        table.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_P=triton.next_power_of_2(group), BS=bs, D=d,
    )  # fmt: skip
    return out
