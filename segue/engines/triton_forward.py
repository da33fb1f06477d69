"""A paged model's forward pass through segue's Triton kernels (`PagedModel` with kernels
on): each residual add fused with the norm after it, rotary fused with the K/V write,
SiLU(gate) * up in one kernel, and attention reading the pool in place (`paged_attention`
for a decode step's single queries, `paged_prefill` for prompt chunks). A decode step of at
most `PagedModel.gemv_rows` rows also folds the norms and SiLU into the matrix products
(`fused_gemv`): seven kernels a layer instead of ten, where a batch of one is bound by its
weights read once plus a gap per kernel.
"""

from __future__ import annotations

from typing import Any

from segue.engines import fused_gemv, fused_ops, paged_attention, paged_prefill


def forward(m: Any, tok: Any, pos: Any, slot: Any, table: Any) -> Any:
    """`PagedModel._forward`'s contract: tok, pos, slot [B, Q]; table [B, NB]. Returns the
    hidden states after the final norm, [B, Q, H]; writes each token's K/V to its slot."""
    return forward_groups(m, [(tok, pos, slot, table)])[0]


def forward_groups(m: Any, groups: list[tuple[Any, Any, Any, Any]]) -> list[Any]:
    """Several batches in one pass, each (tok, pos, slot, table) as `forward` takes it (a
    step's decode rows, [B, 1], beside its prompt chunks, [B, Q]): their tokens are the
    rows of the same products (the weights read once), each batch attends by its own
    kernel. Returns each batch's hidden states, [B, Q, H]."""
    torch = m.torch
    nh, kvh, hd = m.heads, m.kv_heads, m.head_dim
    shapes = [g[0].shape for g in groups]
    counts = [b * q for b, q in shapes]

    def flat(i: int) -> Any:
        parts = [g[i].reshape(-1) for g in groups]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)

    tok, pos, slot = flat(0), flat(1), flat(2)  # a graph's slots are a strided column
    total = tok.shape[0]
    h = m.inner.embed_tokens(tok)  # [T, H]
    cos, sin = m.inner.rotary_emb(h[None], pos[None])
    cos, sin = cos.reshape(total, hd), sin.reshape(total, hd)
    few = len(groups) == 1 and shapes[0][1] == 1 and shapes[0][0] <= m.gemv_rows
    # per batch: its rows of q, their shape, table, lengths (decodes) or positions, splits
    attends: list[tuple[slice, tuple, Any, Any, int]] = []
    at = 0
    for (b, q), (_, bpos, _, table) in zip(shapes, groups, strict=True):
        rows = slice(at, at + b * q)
        if q == 1:
            splits = paged_attention.splits_for(b, kvh, table.shape[1] * m.block_size, m.sms)
            attends.append((rows, (b, nh, hd), table, bpos[:, 0] + 1, splits))
        else:
            attends.append((rows, (b, q, nh, hd), table, bpos, 0))
        at += b * q
    pending = None  # the last MLP's output, added to h by the next norm
    for i, layer in enumerate(m.inner.layers):
        ln = layer.input_layernorm
        if few:
            w = m._qkv[i][0]
            qkv, h = fused_gemv.norm_gemv(h, pending, ln.weight, ln.variance_epsilon, w)
        elif pending is None:
            qkv = m._linear(m._norm(ln, h), m._qkv[i])
        else:
            x = fused_ops.add_norm(h, pending, ln.weight, ln.variance_epsilon)
            qkv = m._linear(x, m._qkv[i])
        qkv = qkv.view(total, nh + 2 * kvh, hd)
        kpool, vpool = m.k[i], m.v[i]  # [blocks, bs, KVH, D]
        flat_k, flat_v = kpool.view(-1, kvh, hd), vpool.view(-1, kvh, hd)
        qs = fused_ops.rotary_kv(qkv, cos, sin, slot, flat_k, flat_v, nh)  # [T, NH, D]
        o = torch.empty_like(qs)
        for rows, shape, table, at_pos, splits in attends:
            qo, oo = qs[rows].view(shape), o[rows].view(shape)
            if splits:
                paged_attention.decode_attention(qo, kpool, vpool, table, at_pos, splits, oo)
            else:
                paged_prefill.prefill_attention(qo, kpool, vpool, table, at_pos, oo)
        out = layer.self_attn.o_proj(o.view(total, nh * hd))
        ln = layer.post_attention_layernorm
        if few:
            gu, h = fused_gemv.norm_gemv(h, out, ln.weight, ln.variance_epsilon, m._gu[i][0])
            pending = fused_gemv.silu_gemv(gu, layer.mlp.down_proj.weight)
        else:
            y = fused_ops.add_norm(h, out, ln.weight, ln.variance_epsilon)
            pending = layer.mlp.down_proj(fused_ops.silu_mul(m._linear(y, m._gu[i])))
    final = m.inner.norm
    if pending is None:
        h = m._norm(final, h)
    else:
        h = fused_ops.add_norm(h, pending, final.weight, final.variance_epsilon)
    return [x.view(b, q, -1) for x, (b, q) in zip(h.split(counts), shapes, strict=True)]
