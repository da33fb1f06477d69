"""A paged model's forward pass through segue's Triton kernels (`PagedModel` with kernels
on): each residual add fused with the norm after it, rotary fused with the K/V write (and,
in a decode step, with the attention itself),
SiLU(gate) * up in one kernel, and attention reading the pool in place (`paged_attention`
for a decode step's single queries, `paged_prefill` for prompt chunks). The matrix products
are cuBLAS's, except a one-token step's small ones (q/k/v, o): `gemv`'s.
"""

from __future__ import annotations

from typing import Any

from segue.engines import fused_ops, gemv, paged_attention, paged_prefill


def forward(m: Any, tok: Any, pos: Any, slot: Any, table: Any) -> Any:
    """`PagedModel._forward`'s contract: tok, pos, slot [B, Q]; table [B, NB]. Returns the
    hidden states after the final norm, [B, Q, H]; writes each token's K/V to its slot."""
    b, q = tok.shape
    nh, kvh, hd = m.heads, m.kv_heads, m.head_dim
    flat = slot.reshape(-1).contiguous()  # a graph's slots are a strided column
    h = m.inner.embed_tokens(tok)
    cos, sin = m.inner.rotary_emb(h, pos)
    cos, sin = cos.reshape(b * q, hd), sin.reshape(b * q, hd)
    if q == 1:
        lens = pos[:, 0] + 1
        splits = paged_attention.splits_for(b, kvh, table.shape[1] * m.block_size, m.sms)
    pending = None  # the last MLP's output, added to h by the next norm
    for i, layer in enumerate(m.inner.layers):
        ln = layer.input_layernorm
        if pending is None:
            x = m._norm(ln, h)
        else:
            x = fused_ops.add_norm(h, pending, ln.weight, ln.variance_epsilon)
        qkv = gemv.product(x, *m._qkv[i])
        qkv = qkv.view(b * q, nh + 2 * kvh, hd)
        kpool, vpool = m.k[i], m.v[i]  # [blocks, bs, KVH, D]
        if q == 1:  # rotary and the K/V write inside the attention kernel
            o = paged_attention.decode_attention_rope(
                qkv, cos, sin, flat, kpool, vpool, table, lens, splits
            )
        else:
            flat_k, flat_v = kpool.view(-1, kvh, hd), vpool.view(-1, kvh, hd)
            qs = fused_ops.rotary_kv(qkv, cos, sin, flat, flat_k, flat_v, nh)  # [B*Q, NH, D]
            o = paged_prefill.prefill_attention(qs.view(b, q, nh, hd), kpool, vpool, table, pos)
        ln = layer.post_attention_layernorm
        o_proj = layer.self_attn.o_proj
        out = gemv.product(o.reshape(b, q, nh * hd), o_proj.weight, o_proj.bias)
        y = fused_ops.add_norm(h, out, ln.weight, ln.variance_epsilon)
        down = layer.mlp.down_proj
        act = fused_ops.silu_mul(gemv.product(y, *m._gu[i]))
        pending = gemv.product(act, down.weight, down.bias)
    final = m.inner.norm
    if pending is None:
        return m._norm(final, h).view(b, q, -1)
    return fused_ops.add_norm(h, pending, final.weight, final.variance_epsilon).view(b, q, -1)
