"""Prefill attention that reads the paged KV pool in place (a Triton kernel).

A step's prompt chunks, padded to [B, Q] queries, each query at its own position of its
sequence, attend causally to their sequence's positions up to their own, through its block
table: earlier chunks and cached blocks are read where they lie, never gathered into a padded
copy (what the SDPA path of `paged.py` does). A program serves one (sequence, KV head, tile
of M queries): the tile's queries times the group's query heads (grouped-query attention) are
the rows of one tensor-core product against tiles of TILE positions, with an online softmax
in fp32, up to the tile's last position. The chunk's own K/V are in the pool already (the
rotary kernel writes them first). Padding queries (at their chunk's first position) compute
something harmless that nobody reads.

On CPU the tests run it through Triton's interpreter (TRITON_INTERPRET=1) against SDPA over
the gathered blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from segue.engines.paged_attention import TILE, attend_tile

M = 16  # queries per program


@triton.jit
def _prefill_kernel(
    q_ptr,  # [B, Q, NH, D]
    k_ptr,  # [blocks, BS, KVH, D]
    v_ptr,
    table_ptr,  # [B, NB] block ids
    pos_ptr,  # [B, Q] each query's position
    out_ptr,  # [B, Q, NH, D]
    scale,
    q_len,
    stride_qb,
    stride_qq,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_pb,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP padded to a power of two
    M: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 weights: exact products, not tf32
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    r = tl.arange(0, M * GROUP_P)  # rows: query r // GROUP_P, head r % GROUP_P of the group
    qi = tl.program_id(2) * M + r // GROUP_P
    g = r % GROUP_P
    live_row = (qi < q_len) & (g < GROUP)
    d = tl.arange(0, D)
    t = tl.arange(0, TILE_N)
    head = kvh * GROUP + g
    q_off = b * stride_qb + qi[:, None] * stride_qq + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=live_row[:, None], other=0.0)
    q = (q.to(tl.float32) * scale).to(k_ptr.dtype.element_ty)
    pos = tl.load(pos_ptr + b * stride_pb + qi, mask=live_row, other=0)  # [R]
    n = tl.max(tl.where(live_row, pos, 0), axis=0) + 1  # positions the tile reads
    m = tl.full([M * GROUP_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([M * GROUP_P], tl.float32)
    acc = tl.zeros([M * GROUP_P, D], tl.float32)
    table_row = table_ptr + b * stride_tb
    for j in range(0, tl.cdiv(n, TILE_N)):
        kpos = j * TILE_N + t
        live = kpos < n
        seen = (kpos[None, :] <= pos[:, None]) & live[None, :]  # causal
        m, l_sum, acc = attend_tile(
            q, m, l_sum, acc, k_ptr, v_ptr, table_row, kpos, live, seen,
            kvh * stride_kh, stride_kb, stride_ks, BS, D, IEEE,
        )  # fmt: skip
    out = acc / l_sum[:, None]  # every row saw position 0
    o_off = b * stride_qb + qi[:, None] * stride_qq + head[:, None] * stride_qh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=live_row[:, None])


def prefill_attention(q: Any, k_pool: Any, v_pool: Any, table: Any, pos: Any) -> Any:
    """q [B, Q, NH, D]; k_pool, v_pool [blocks, BS, KVH, D]; table [B, NB] (int); pos [B, Q]:
    each query's position (it sees its sequence's positions up to it). Returns [B, Q, NH, D]
    in q's dtype. Block and head sizes are powers of two, the head size at least 16."""
    b, ql, nh, d = q.shape
    bs, kvh = k_pool.shape[1], k_pool.shape[2]
    group = nh // kvh
    assert v_pool.stride() == k_pool.stride()  # one set of strides for both pools
    q = q.contiguous()
    pos = pos.contiguous()
    out = torch.empty_like(q)
    _prefill_kernel[(b, kvh, triton.cdiv(ql, M))](
        q, k_pool, v_pool, table, pos, out, d**-0.5, ql,
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        table.stride(0), pos.stride(0),
        GROUP=group, GROUP_P=triton.next_power_of_2(group), M=M, BS=bs, D=d,
        TILE_N=max(TILE, bs), IEEE=k_pool.dtype == torch.float32,
    )  # fmt: skip
    return out
