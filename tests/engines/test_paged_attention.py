"""The paged decode-attention kernel, run on CPU through Triton's interpreter: it equals
SDPA over each sequence's gathered blocks (multi-head and grouped-query, a group that is
not a power of two, lengths inside one block and across many, blocks in any order), and a
model's decode step through it equals the SDPA path's."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's module is imported
torch = pytest.importorskip("torch")
pytest.importorskip("triton")


def reference(q, k_pool, v_pool, tables, lens):
    """SDPA over the gathered blocks of each sequence, one at a time."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    out = []
    for i, n in enumerate(lens):
        k = k_pool[tables[i]].flatten(0, 1)[:n]  # [n, KVH, D]
        v = v_pool[tables[i]].flatten(0, 1)[:n]
        o = sdpa(q[i][:, None], k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 2)])
def test_the_kernel_equals_sdpa_over_gathered_blocks(heads, kv_heads):
    from segue.engines.paged_attention import decode_attention

    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, d, blocks = 8, 16, 40
    lens = [1, 7, 8, 9, 33, 61]
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g)
    order = torch.randperm(blocks, generator=g).tolist()
    nb = max(-(-n // bs) for n in lens)
    tables, at = [], 0
    for n in lens:
        own = order[at : at + -(-n // bs)]
        at += len(own)
        tables.append(own + [blocks - 1] * (nb - len(own)))  # padded with any block
    q = torch.randn(len(lens), heads, d, generator=g)
    table = torch.tensor(tables)
    got = decode_attention(q, k_pool, v_pool, table, torch.tensor(lens))
    want = reference(q, k_pool, v_pool, tables, lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_decode_step_through_the_kernel_equals_the_sdpa_path(tmp_path):
    from transformers import AutoModelForCausalLM

    from segue.engines.paged import PagedModel
    from segue.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "m", hidden_size=64, layers=2, heads=4, kv_heads=2)
    logits = {}
    for attention in ("sdpa", "triton"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        paged = PagedModel(model, 16, 16, 8, 4, False, attention=attention)
        assert paged.kernel == (attention == "triton")
        prompts = [list(range(3, 40)), list(range(50, 55))]
        tables = [[0, 1, 2], [5]]
        with torch.no_grad():
            paged.prefill([(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
            step = [(7, len(p), t) for p, t in zip(prompts, tables, strict=True)]
            logits[attention] = paged.decode(step)
    torch.testing.assert_close(logits["triton"], logits["sdpa"], rtol=1e-4, atol=1e-4)
