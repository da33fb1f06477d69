"""The element-wise work around a Llama layer's matrix products, one Triton kernel each
where PyTorch launches several: the residual add with the RMSNorm that follows it, rotary
on q and k with the write of k and v into the paged KV pool, and SiLU(gate) * up.

Each rounds where transformers' modules round (the residual sum and the normalised value in
the model's dtype before the weight; SiLU's result before the product), computing in fp32
between, so results equal the PyTorch path's up to floating-point summation order. On CPU
the tests run them through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl


@triton.jit
def _add_norm_kernel(h_ptr, x_ptr, w_ptr, out_ptr, eps, N: tl.constexpr, N_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, N_P)
    live = c < N
    h = tl.load(h_ptr + row * N + c, mask=live, other=0.0)
    x = tl.load(x_ptr + row * N + c, mask=live, other=0.0)
    s = (h.to(tl.float32) + x.to(tl.float32)).to(h.dtype)
    tl.store(h_ptr + row * N + c, s, mask=live)  # the residual stream, in place
    sf = s.to(tl.float32)
    normed = sf * tl.rsqrt(tl.sum(sf * sf, axis=0) / N + eps)
    w = tl.load(w_ptr + c, mask=live, other=0.0).to(tl.float32)
    out = normed.to(h.dtype).to(tl.float32) * w
    tl.store(out_ptr + row * N + c, out.to(out_ptr.dtype.element_ty), mask=live)


def add_norm(h: Any, x: Any, weight: Any, eps: float) -> Any:
    """h += x (in place, contiguous [..., N]); returns RMSNorm(h) * weight."""
    n = h.shape[-1]
    out = torch.empty_like(h)
    rows = h.numel() // n
    _add_norm_kernel[(rows,)](h, x.contiguous(), weight, out, eps, N=n,
                              N_P=triton.next_power_of_2(n))  # fmt: skip
    return out


@triton.jit
def rotate(rows, cos_ptr, sin_ptr, mask, D: tl.constexpr):
    """Rows of D values at `rows` ([R, 1] pointers, or one row), rotated: x * cos +
    rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; products rounded to x's dtype before
    the sum, as transformers' rotary rounds."""
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    x = tl.load(rows + d, mask=mask, other=0.0)
    partner = tl.load(rows + (d + HALF) % D, mask=mask, other=0.0).to(tl.float32)
    dt = x.dtype
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.where(d < HALF, -1.0, 1.0) * tl.load(sin_ptr + d).to(tl.float32)
    turned = (partner * sin).to(dt).to(tl.float32)
    return ((x.to(tl.float32) * cos).to(dt).to(tl.float32) + turned).to(dt)


@triton.jit
def _rotary_kv_kernel(
    qkv_ptr,  # [T, NH + 2 * KVH, D]
    cos_ptr,  # [T, D]
    sin_ptr,
    slot_ptr,  # [T] pool slots
    q_ptr,  # [T, NH, D] out
    k_ptr,  # pool [slots, KVH, D]
    v_ptr,
    NH: tl.constexpr,
    KVH: tl.constexpr,
    NH_P: tl.constexpr,
    D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    W: tl.constexpr = NH + 2 * KVH
    hh = tl.arange(0, NH_P)
    d = tl.arange(0, D)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    rot = hh < NH + KVH  # q and k heads
    out = rotate(qkv_ptr + t * W * D + hh[:, None] * D, cos_ptr + t * D, sin_ptr + t * D,
                 rot[:, None], D)  # fmt: skip
    isq = hh < NH
    tl.store(q_ptr + t * NH * D + hh[:, None] * D + d[None, :], out, mask=isq[:, None])
    isk = (hh >= NH) & rot
    krow = k_ptr + slot * KVH * D + (hh - NH)[:, None] * D
    tl.store(krow + d[None, :], out, mask=isk[:, None])
    # v heads: copied as they are
    isv = hh < KVH
    v = tl.load(qkv_ptr + t * W * D + (NH + KVH + hh)[:, None] * D + d[None, :],
                mask=isv[:, None], other=0.0)  # fmt: skip
    tl.store(v_ptr + slot * KVH * D + hh[:, None] * D + d[None, :], v, mask=isv[:, None])


def rotary_kv(qkv: Any, cos: Any, sin: Any, slot: Any, k_pool: Any, v_pool: Any, heads: int) -> Any:
    """qkv [T, NH + 2 KVH, D] (contiguous); cos, sin [T, D]; slot [T]; pools [.., KVH, D]
    contiguous. Writes rotated k and v to their slots; returns rotated q [T, NH, D]."""
    t, width, d = qkv.shape
    kvh = (width - heads) // 2
    q = torch.empty(t, heads, d, dtype=qkv.dtype, device=qkv.device)
    _rotary_kv_kernel[(t,)](
        qkv, cos.contiguous(), sin.contiguous(), slot, q, k_pool, v_pool,
        NH=heads, KVH=kvh, NH_P=triton.next_power_of_2(heads + kvh), D=d,
    )  # fmt: skip
    return q


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = c < INTER
    g = tl.load(gu_ptr + row * 2 * INTER + c, mask=live, other=0.0)
    u = tl.load(gu_ptr + row * 2 * INTER + INTER + c, mask=live, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * INTER + c, (act * u.to(tl.float32)).to(g.dtype), mask=live)


def silu_mul(gu: Any) -> Any:
    """gu [..., 2 I] (gate then up, contiguous); returns SiLU(gate) * up, [..., I]."""
    inter = gu.shape[-1] // 2
    rows = gu.numel() // (2 * inter)
    out = torch.empty(*gu.shape[:-1], inter, dtype=gu.dtype, device=gu.device)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gu, out, INTER=inter, BLOCK=block)
    return out
