"""segue's Triton kernels, run on CPU through Triton's interpreter: paged decode attention
equals SDPA over each sequence's gathered blocks (multi-head and grouped-query, a group that
is not a power of two, lengths inside one block and across many, blocks in any order, the
context split over several programs), also with the step's rotary and K/V write inside;
prefill attention equals causal SDPA over gathered blocks for chunks at offsets; the fused
norm, rotary and activation equal PyTorch's ops in fp32 and bf16, as do one-row
matrix-vector products; and a model's prefill and decode steps through them equal the
PyTorch path's, greedy tokens included."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and Triton's interpreter is off", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


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


def needs_real_bf16_dot(dtype: str) -> None:
    """Triton's interpreter computes tl.dot on bf16 inputs wrongly (a 16x16 product off by
    1e10 here): bf16 through the attention kernels is checked on a GPU only."""
    if dtype == "bfloat16" and DEV != "cuda":
        pytest.skip("Triton's interpreter miscomputes tl.dot on bf16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "splits"), [(4, 4, 1), (8, 2, 1), (6, 2, 1), (8, 2, 3), (4, 4, 8)]
)
def test_the_kernel_equals_sdpa_over_gathered_blocks(heads, kv_heads, splits, dtype):
    from segue.engines.paged_attention import decode_attention

    needs_real_bf16_dot(dtype)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    bs, d, blocks = 8, 16, 60
    lens = [1, 7, 8, 9, 64, 65, 200]  # one position; inside a block; tiles of 64 and more
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEV, dt)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEV, dt)
    order = torch.randperm(blocks, generator=g).tolist()
    nb = max(-(-n // bs) for n in lens)
    tables, at = [], 0
    for n in lens:
        own = order[at : at + -(-n // bs)]
        at += len(own)
        tables.append(own + [blocks - 1] * (nb - len(own)))  # padded with any block
    q = torch.randn(len(lens), heads, d, generator=g).to(DEV, dt)
    table = torch.tensor(tables, device=DEV)
    got = decode_attention(q, k_pool, v_pool, table, torch.tensor(lens, device=DEV), splits)
    want = reference(q, k_pool, v_pool, tables, lens)
    tol = 1e-5 if dt == torch.float32 else 2e-2  # bf16: the reference rounds elsewhere
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "splits"), [(4, 4, 1), (8, 2, 1), (6, 2, 3), (8, 2, 3), (4, 4, 8)]
)
def test_attention_with_rotary_equals_rotary_then_attention(heads, kv_heads, splits, dtype):
    """A decode step's rotary, K/V write and attention in one kernel: the same output and
    the same pools as `rotary_kv` then `decode_attention`, whichever split holds the new
    position (lengths one past a tile: its tile holds no pool position), nothing else
    written."""
    from segue.engines import fused_ops
    from segue.engines.paged_attention import decode_attention, decode_attention_rope

    needs_real_bf16_dot(dtype)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(heads * 10 + kv_heads + splits)
    bs, d, blocks = 8, 16, 70
    lens = [1, 2, 9, 64, 65, 129, 200]
    pools = [torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEV, dt) for _ in range(2)]
    order = torch.randperm(blocks, generator=g).tolist()
    nb = max(-(-n // bs) for n in lens)
    tables, slots, at = [], [], 0
    for n in lens:
        own = order[at : at + -(-n // bs)]
        at += len(own)
        tables.append(own + [blocks - 1] * (nb - len(own)))
        slots.append(own[(n - 1) // bs] * bs + (n - 1) % bs)
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, d, generator=g).to(DEV, dt)
    ang = torch.randn(len(lens), d // 2, generator=g).to(DEV)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    table, n = torch.tensor(tables, device=DEV), torch.tensor(lens, device=DEV)
    slot = torch.tensor(slots, device=DEV)
    k1, v1 = (p.clone() for p in pools)
    q = fused_ops.rotary_kv(qkv, cos, sin, slot, k1.view(-1, kv_heads, d),
                            v1.view(-1, kv_heads, d), heads)  # fmt: skip
    want = decode_attention(q, k1, v1, table, n, splits)
    k2, v2 = (p.clone() for p in pools)
    got = decode_attention_rope(qkv, cos, sin, slot, k2, v2, table, n, splits)
    tol = 1e-5 if dt == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    exact = {"rtol": 1e-6, "atol": 1e-6} if dt == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(k2, k1, **exact)  # the new keys; every other slot as it was
    assert torch.equal(v2, v1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_ops_equal_pytorchs(dtype):
    from segue.engines import fused_ops

    dt = getattr(torch, dtype)
    # bf16: within two of its ulps (the interpreter truncates where a GPU rounds)
    tol = dict(rtol=1e-6, atol=1e-6) if dt == torch.float32 else dict(rtol=2.5e-2, atol=1e-2)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 96, generator=g).to(DEV, dt)
    x = torch.randn(5, 96, generator=g).to(DEV, dt)
    w = torch.randn(96, generator=g).to(DEV, dt)
    want_h = h + x
    s = want_h.float()
    want = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)
    got = fused_ops.add_norm(h, x, w, 1e-5)
    # the residual stream, in place (bf16 within an ulp: the interpreter may truncate)
    torch.testing.assert_close(h, want_h, **tol)
    torch.testing.assert_close(got, want, **tol)

    nh, kvh, d = 6, 2, 16
    qkv = torch.randn(3, nh + 2 * kvh, d, generator=g).to(DEV, dt)
    ang = torch.randn(3, d // 2, generator=g).to(DEV)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    slots = torch.tensor([4, 0, 9], device=DEV)
    k_pool = torch.zeros(10, kvh, d, dtype=dt, device=DEV)
    v_pool = torch.zeros(10, kvh, d, dtype=dt, device=DEV)
    qk = qkv[:, : nh + kvh]
    rot = qk * cos[:, None] + torch.cat((-qk[..., d // 2 :], qk[..., : d // 2]), -1) * sin[:, None]
    q = fused_ops.rotary_kv(qkv, cos, sin, slots, k_pool, v_pool, nh)
    torch.testing.assert_close(q, rot[:, :nh], **tol)
    torch.testing.assert_close(k_pool[slots], rot[:, nh:], **tol)
    assert torch.equal(v_pool[slots], qkv[:, nh + kvh :])
    assert not k_pool[[1, 2, 3, 5, 6, 7, 8]].any()  # nothing else written

    gu = torch.randn(2, 3, 2 * 40, generator=g).to(DEV, dt)
    want = torch.nn.functional.silu(gu[..., :40]) * gu[..., 40:]
    torch.testing.assert_close(fused_ops.silu_mul(gu), want, **tol)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_one_row_matrix_vector_products_equal_pytorch_linear(dt):
    """A decode step's one-row products: with and without bias (K not a power of two, more
    than one K chunk), and the output layer's straight to fp32, equal PyTorch's."""
    from segue.engines import gemv

    g = torch.Generator().manual_seed(3)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dt == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    w = torch.randn(70, 1100, generator=g).to(DEV, dt) / 30
    bias = torch.randn(70, generator=g).to(DEV, dt)
    x = torch.randn(1, 1, 1100, generator=g).to(DEV, dt)
    lin = torch.nn.functional.linear
    assert gemv.serves(x, w) and not gemv.serves(torch.cat([x, x]), w)  # two rows: cuBLAS
    big = torch.empty(gemv.MAX_WEIGHTS // 1024 + 1, 1024, device="meta")
    assert not gemv.serves(x.to("meta")[..., :1024], big)
    torch.testing.assert_close(gemv.linear(x, w), lin(x, w), **tol)
    torch.testing.assert_close(gemv.linear(x, w, bias), lin(x, w, bias), **tol)
    logits = gemv.linear(x, w, None, torch.float32)
    assert logits.dtype == torch.float32 and logits.shape == (1, 1, 70)
    torch.testing.assert_close(logits, lin(x, w).float(), **tol)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_model_through_the_kernels_equals_the_pytorch_path(tmp_path, graphs):
    if graphs and DEV != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    from transformers import AutoModelForCausalLM

    from segue.engines.paged import PagedModel
    from segue.models.tiny import build_tiny_llama

    path = build_tiny_llama(tmp_path / "m", hidden_size=64, layers=2, heads=4, kv_heads=2)
    logits, tokens = {}, {}
    for kernels in ("torch", "triton"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEV)
        paged = PagedModel(model, 16, 16, 8, 4, graphs, kernels=kernels)
        assert paged.kernel == (kernels == "triton")
        prompts = [list(range(3, 40)), list(range(50, 64))]
        tables = [[0, 1, 2], [5, 6]]
        with torch.no_grad():
            first, _ = paged.prefill([(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
            out = [first]
            ids = first.argmax(-1).tolist()
            seqs = [[i] for i in ids]
            for n in range(6):  # greedy decode steps, across a block boundary for row 1
                step = [(ids[r], len(prompts[r]) + n, tables[r]) for r in range(2)]
                out.append(paged.decode(step))
                ids = out[-1].argmax(-1).tolist()
                for r in range(2):
                    seqs[r].append(ids[r])
        logits[kernels], tokens[kernels] = torch.stack(out), seqs
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    assert tokens["triton"] == tokens["torch"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 2)])
def test_prefill_attention_equals_sdpa_over_gathered_blocks(heads, kv_heads, dtype):
    """Ragged prompt chunks, each at an offset of its sequence (earlier chunks and cached
    blocks already in the pool), padded to one query length: every real query's output
    equals causal SDPA over its sequence's gathered positions."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from segue.engines.paged_prefill import prefill_attention

    needs_real_bf16_dot(dtype)
    dt = getattr(torch, dtype)
    tol = 1e-5 if dt == torch.float32 else 2e-2  # bf16: the reference rounds elsewhere
    g = torch.Generator().manual_seed(heads * 10 + kv_heads + 1)
    bs, d, blocks = 8, 16, 80
    chunks = [(0, 1), (0, 20), (5, 3), (64, 17), (130, 40)]  # (start, length)
    k_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEV, dt)
    v_pool = torch.randn(blocks, bs, kv_heads, d, generator=g).to(DEV, dt)
    order = torch.randperm(blocks, generator=g).tolist()
    ql = max(n for _, n in chunks)
    nb = max(-(-(s + n) // bs) for s, n in chunks)
    tables, pos, at = [], [], 0
    for s, n in chunks:
        own = order[at : at + -(-(s + n) // bs)]
        at += len(own)
        tables.append(own + [blocks - 1] * (nb - len(own)))
        pos.append(list(range(s, s + n)) + [s] * (ql - n))  # padding: at the chunk's first
    q = torch.randn(len(chunks), ql, heads, d, generator=g).to(DEV, dt)
    got = prefill_attention(
        q, k_pool, v_pool, torch.tensor(tables, device=DEV), torch.tensor(pos, device=DEV)
    )
    for i, (s, n) in enumerate(chunks):
        k = k_pool[tables[i]].flatten(0, 1)[: s + n].transpose(0, 1)  # [KVH, L, D]
        v = v_pool[tables[i]].flatten(0, 1)[: s + n].transpose(0, 1)
        mask = (
            torch.arange(s + n, device=DEV)[None, :] <= torch.arange(s, s + n, device=DEV)[:, None]
        )
        want = sdpa(q[i, :n].transpose(0, 1), k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got[i, :n], want.transpose(0, 1), rtol=tol, atol=tol)
