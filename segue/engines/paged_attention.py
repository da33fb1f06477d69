"""Decode attention that reads the paged KV pool in place (Triton kernels).

One query token per sequence attends to its positions [0, length) through its block table:
no sequence's KV is copied into a padded rectangle first (what the SDPA path of `paged.py`
does), so a step reads each live block once. A program serves one (sequence, KV head,
split): the query heads of that group (grouped-query attention) as the rows of a tensor-core
matrix product, over tiles of TILE positions gathered through the block table, with an
online softmax in fp32. The context is split over SPLITS programs (flash-decoding: a batch
of one still fills the GPU); a second kernel merges their partial results by their
log-sum-exp (with one split, the first kernel writes the output). Loop bounds are read from
the lengths tensor on the GPU, so a captured CUDA graph replays the step for any lengths
within its bucket.

`decode_attention_rope` also does the rotary embedding and the step's K/V write, one kernel
a layer fewer: each program rotates its query rows from the fused q/k/v product; the one
program of each (sequence, KV head) whose split holds the new position rotates the new key,
stores key and value into the pool, and folds them into its softmax from registers, so no
program reads a slot that another writes.

On CPU the tests run the same kernels through Triton's interpreter (TRITON_INTERPRET=1,
set before this module is imported) and compare them with SDPA over the gathered blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from segue.engines.fused_ops import rotate

TILE = 64  # positions per inner step (a multiple of the block size, or gathered across blocks)


@triton.jit
def attend_tile(
    q,  # [R, D] queries (scaled), in the pool's dtype
    m,  # [R] running max of the scores
    l_sum,  # [R] running sum of exp(score - m)
    acc,  # [R, D] fp32: running sum of exp(score - m) * v
    k_ptr,
    v_ptr,
    table_row,  # the sequence's block table
    pos,  # [TILE_N] the positions of this tile
    live,  # [TILE_N] positions the sequence has
    seen,  # [R or 1, TILE_N] positions each row attends to
    head_off,  # the KV head's offset in the pool
    stride_kb,
    stride_ks,
    BS: tl.constexpr,
    D: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 weights: exact products, not tf32
):
    """One tile of positions, gathered through the block table, folded into the rows'
    online softmax (fp32). Every row must see a position in its first tile."""
    d = tl.arange(0, D)
    block = tl.load(table_row + pos // BS, mask=live, other=0).to(tl.int64)
    offs = block[:, None] * stride_kb + (pos % BS)[:, None] * stride_ks + head_off + d[None, :]
    k = tl.load(k_ptr + offs, mask=live[:, None], other=0.0)  # [TILE_N, D]
    v = tl.load(v_ptr + offs, mask=live[:, None], other=0.0)
    if IEEE:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))  # [R, TILE_N]
    scores = tl.where(seen, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc * alpha[:, None] + pv


@triton.jit
def _partial_kernel(
    q_ptr,  # [B, NH, D]
    k_ptr,  # [blocks, BS, KVH, D]
    v_ptr,
    table_ptr,  # [B, NB] block ids
    lens_ptr,  # [B] positions each query sees
    acc_ptr,  # [B, NH, SPLITS, D] fp32: unnormalised partial outputs
    lse_ptr,  # [B, NH, SPLITS, 2] fp32: running max and sum of each split
    out_ptr,  # [B, NH, D]: the output itself, when one split covers the context (DIRECT)
    cos_ptr,  # [B, D] (ROPE)
    sin_ptr,
    slot_ptr,  # [B] the new position's pool slot (ROPE)
    scale,
    splits,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_ob,
    stride_oh,
    DIRECT: tl.constexpr,
    ROPE: tl.constexpr,  # q_ptr is the q/k/v product [B, NH + 2 KVH, D], not yet rotated
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # rows of the product: GROUP padded to a power of two, >= 16
    BS: tl.constexpr,
    D: tl.constexpr,
    TILE_N: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 weights: exact products, not tf32
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D)
    t = tl.arange(0, TILE_N)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    row_ptr = q_ptr + b * stride_qb
    if ROPE:
        q = rotate(row_ptr + heads[:, None] * stride_qh, cos_ptr + b * D, sin_ptr + b * D,
                     gmask[:, None], D)  # fmt: skip
    else:
        q = tl.load(row_ptr + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None],
                    other=0.0)  # fmt: skip
    q = (q.to(tl.float32) * scale).to(k_ptr.dtype.element_ty)
    n = tl.load(lens_ptr + b)
    tiles = tl.cdiv(n, TILE_N)
    per = tl.cdiv(tiles, splits)
    first = split * per
    last = tl.minimum(first + per, tiles)
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D], tl.float32)
    in_pool = n  # positions read from the pool
    if ROPE:
        # The new position (n - 1) is in the last tile; the split that holds it takes it
        # from registers first (so every row's max is finite) and writes it to the pool.
        in_pool = n - 1
        owner = (first < tiles) & (tiles <= last)
        nh = tl.num_programs(1) * GROUP
        k_new = rotate(row_ptr + (nh + kvh) * stride_qh, cos_ptr + b * D, sin_ptr + b * D,
                         d >= 0, D)  # fmt: skip
        v_new = tl.load(row_ptr + (nh + tl.num_programs(1) + kvh) * stride_qh + d)
        score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1)
        m = tl.where(owner, score, m)
        l_sum = tl.where(owner, 1.0, l_sum)
        acc = tl.where(owner, acc + v_new.to(tl.float32)[None, :], acc)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        at = (slot // BS) * stride_kb + (slot % BS) * stride_ks + kvh * stride_kh + d
        keep = d < tl.where(owner, D, 0)  # (not `&`: the interpreter makes that int32)
        tl.store(k_ptr + at, k_new.to(k_ptr.dtype.element_ty), mask=keep)
        tl.store(v_ptr + at, v_new.to(v_ptr.dtype.element_ty), mask=keep)
    table_row = table_ptr + b * stride_tb
    for j in range(first, last):
        pos = j * TILE_N + t
        live = pos < in_pool
        m, l_sum, acc = attend_tile(
            q, m, l_sum, acc, k_ptr, v_ptr, table_row, pos, live, live[None, :],
            kvh * stride_kh, stride_kb, stride_ks, BS, D, IEEE,
        )  # fmt: skip
    if DIRECT:
        out = acc / l_sum[:, None]
        dst = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        return
    row = (b * tl.num_programs(1) * GROUP + heads) * splits + split
    tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    tl.store(lse_ptr + row * 2, m, mask=gmask)
    tl.store(lse_ptr + row * 2 + 1, l_sum, mask=gmask)


@triton.jit
def _merge_kernel(
    acc_ptr,  # [B * NH, SPLITS, D]
    lse_ptr,  # [B * NH, SPLITS, 2]
    out_ptr,  # [B, NH, D]
    splits,
    stride_ob,
    stride_oh,
    NH: tl.constexpr,
    SPLITS_P: tl.constexpr,
    D: tl.constexpr,
):
    row = tl.program_id(0)  # b * NH + head
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D)
    live = s < splits
    m = tl.load(lse_ptr + (row * splits + s) * 2, mask=live, other=float("-inf"))
    l_sum = tl.load(lse_ptr + (row * splits + s) * 2 + 1, mask=live, other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)  # a split with no positions: 0
    acc = tl.load(
        acc_ptr + (row * splits + s)[:, None] * D + d[None, :], mask=live[:, None], other=0.0
    )
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    b = row // NH
    h = row % NH
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def splits_for(batch: int, kv_heads: int, max_len: int, sms: int) -> int:
    """Programs per (sequence, KV head): enough to give every SM two programs, no more
    than the context has tiles. Fixed per captured graph (its batch and block bucket)."""
    tiles = max(1, -(-max_len // TILE))
    return max(1, min(tiles, -(-2 * sms // (batch * kv_heads))))


def decode_attention(
    q: Any, k_pool: Any, v_pool: Any, table: Any, lens: Any, splits: int = 1
) -> Any:
    """q [B, NH, D]; k_pool, v_pool [blocks, BS, KVH, D]; table [B, NB] (int); lens [B]:
    the positions each query attends to (at least one each); `splits`: programs per
    (sequence, KV head). Returns [B, NH, D] in q's dtype. Block and head sizes are powers
    of two (Triton's ranges), the head size at least 16."""
    q = q.contiguous()
    return _attend(q, q.shape[1], k_pool, v_pool, table, lens, splits, None)


def decode_attention_rope(
    qkv: Any, cos: Any, sin: Any, slot: Any, k_pool: Any, v_pool: Any, table: Any, lens: Any,
    splits: int = 1,
) -> Any:  # fmt: skip
    """`fused_ops.rotary_kv` then `decode_attention`, in one kernel: qkv [B, NH + 2 KVH, D]
    (contiguous) as the q/k/v product leaves it; cos, sin [B, D]; slot [B]: where each
    sequence's new position (lens - 1) goes in the pools. Returns [B, NH, D]."""
    nh = qkv.shape[1] - 2 * k_pool.shape[2]
    return _attend(qkv, nh, k_pool, v_pool, table, lens, splits, (cos, sin, slot))


def _attend(
    q: Any, nh: int, k_pool: Any, v_pool: Any, table: Any, lens: Any, splits: int,
    rope: tuple[Any, Any, Any] | None,
) -> Any:  # fmt: skip
    b, _, d = q.shape
    bs, kvh = k_pool.shape[1], k_pool.shape[2]
    assert v_pool.stride() == k_pool.stride()  # one set of strides for both pools
    out = torch.empty(b, nh, d, dtype=q.dtype, device=q.device)
    direct = splits == 1  # no partial results to merge: the one kernel writes the output
    acc = torch.empty(0 if direct else b * nh * splits * d, dtype=torch.float32, device=q.device)
    lse = torch.empty(0 if direct else b * nh * splits * 2, dtype=torch.float32, device=q.device)
    group = nh // kvh
    cos, sin, slot = (c.contiguous() for c in rope) if rope else (q, q, lens)
    _partial_kernel[(b, kvh, splits)](
        q, k_pool, v_pool, table, lens, acc, lse, out, cos, sin, slot, d**-0.5, splits,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        table.stride(0), out.stride(0), out.stride(1), DIRECT=direct, ROPE=rope is not None,
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), BS=bs, D=d,
        TILE_N=max(TILE, bs), IEEE=k_pool.dtype == torch.float32,
    )  # fmt: skip
    if direct:
        return out
    _merge_kernel[(b * nh,)](
        acc, lse, out, splits, out.stride(0), out.stride(1),
        NH=nh, SPLITS_P=triton.next_power_of_2(splits), D=d,
    )  # fmt: skip
    return out
