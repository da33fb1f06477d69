"""Batched forward passes of a Llama-family model over a paged KV cache.

The KV cache is one preallocated pool per layer of `num_blocks * block_size` slots (plus one
scratch block that padding writes into); a sequence owns a list of blocks (its block table)
and the KV of its token at position p lives in slot `table[p // bs] * bs + p % bs`. A step
runs every sequence it is given in one forward pass: each layer writes the new tokens' K/V
into their slots, gathers every sequence's context from its blocks and runs PyTorch's SDPA
with a mask that lets query i of a sequence see its positions up to its own. Batches are
padded to rectangles; on a GPU to shape buckets (rows, query length, blocks), and each
bucket's step, decodes or prompt chunks, replays a CUDA graph (`step_graphs`). On a GPU (or
when asked) the layers run through segue's Triton kernels (`triton_forward`): attention
reading each sequence's blocks in place (`paged_attention` for decodes, `paged_prefill` for
prompt chunks) and the element-wise work fused (`fused_ops`). The model's own weights, rotary
embedding and activation do the arithmetic (q/k/v and gate/up fused: `fused_weights`), so
the results are those of transformers up to floating-point summation order."""

from __future__ import annotations

import logging
from typing import Any

from segue.engines.fused_weights import fuse_projections
from segue.engines.step_inputs import StepLayout

log = logging.getLogger("segue.paged")

# Architectures whose decoder layers are Llama's (pre-norm, rotary q/k, SDPA-compatible).
SUPPORTED = {"llama", "mistral", "qwen2"}


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class PagedModel:
    def __init__(
        self,
        model: Any,
        num_blocks: int,
        block_size: int,
        max_blocks_per_seq: int,
        max_batch: int,
        cuda_graphs: bool,
        kernels: str = "auto",
    ) -> None:
        import torch

        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(
                f"the hf engine runs {sorted(SUPPORTED)} models, not {cfg.model_type!r}"
            )
        self.torch = torch
        self.model = model
        self.inner = model.model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.layers = len(self.inner.layers)
        # q/k/v and gate/up as one matrix each (the model's parameters become views of them)
        self._qkv, self._gu = fuse_projections(torch, self.inner.layers)
        # segue's Triton kernels ("triton"; "auto": on a GPU, for the shapes they take) or
        # PyTorch's ops with SDPA over gathered blocks ("torch")
        fits = _pow2(block_size) and _pow2(self.head_dim) and self.head_dim >= 16
        if kernels == "triton" and not fits:
            raise ValueError("segue's kernels take power-of-two block and head sizes")
        self.kernel = kernels == "triton" or (
            kernels == "auto" and fits and self.device.type == "cuda"
        )
        self._triton: Any = None
        self._gemv: Any = None
        self.sms = 1
        if self.kernel:
            from segue.engines import gemv, triton_forward

            self._triton, self._gemv = triton_forward, gemv
            if self.device.type == "cuda":
                self.sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.block_size = block_size
        self.max_blocks = max_blocks_per_seq
        self.scratch = num_blocks  # the extra block padding writes into
        shape = (self.layers, num_blocks + 1, block_size, self.kv_heads, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.graphs_on = cuda_graphs and self.device.type == "cuda"
        self.layout = StepLayout(block_size, num_blocks, max_batch, max_blocks_per_seq)
        # Each step's argmax per row stays on the device (decode rows first, prefill rows
        # from `prefill_base`), for the next step to read a token the CPU has not seen
        # (`src`); it reaches the host by one asynchronous copy (`fetch_ids`, `ids`).
        self.prefill_base = max_batch
        self.cuda = pinned = self.device.type == "cuda"
        self.last_ids = torch.zeros(2 * max_batch, dtype=torch.long, device=self.device)
        self._host = [torch.zeros(2 * max_batch, dtype=torch.long, pin_memory=pinned) for _ in "ab"]
        self._events: list[Any] = [torch.cuda.Event() if pinned else None for _ in "ab"]
        self._flip = 0
        if self.graphs_on:
            self.bucket_steps(capture=True)

    def bucket_steps(self, capture: bool) -> None:
        """Steps padded to shape buckets, their inputs in fixed device buffers: captured as
        CUDA graphs (`capture`), or run eagerly the same way (a test of the padding on CPU)."""
        from segue.engines.step_graphs import StepGraphs

        torch, lay = self.torch, self.layout
        pool: list[Any] = []  # one graph memory pool for every kind
        lay.bucketed = True
        dsize, csize = lay.decode_size, lay.chunk_size
        self._decodes = StepGraphs(torch, self.device, dsize, pool, "decode", capture)
        self._prefills = StepGraphs(torch, self.device, csize, pool, "prefill", capture)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.k.element_size()

    def _forward(self, tok: Any, pos: Any, slot: Any, table: Any) -> Any:
        """tok, pos, slot: [B, Q]; table: [B, NB] block ids. Returns hidden states [B, Q, H]
        after the final norm. Writes the K/V of every (b, q) to `slot[b, q]`."""
        torch = self.torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        b, q = tok.shape
        bs = self.block_size
        nb = table.shape[1]
        blocks = table.reshape(-1)
        if self.kernel:
            return self._triton.forward(self, tok, pos, slot, table)
        keys = torch.arange(nb * bs, device=self.device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, Q, L]
        flat = slot.reshape(-1)
        h = self.inner.embed_tokens(tok)
        cos, sin = self.inner.rotary_emb(h, pos)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, Q, 1, D]: over all heads
        nh, kvh, hd = self.heads, self.kv_heads, self.head_dim
        half = hd // 2
        gqa = kvh != nh
        kv_shape = (-1, kvh, hd)
        ctx_shape = (b, nb * bs, kvh, hd)
        for i, layer in enumerate(self.inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self._norm(layer.input_layernorm, h)
            qkv = self._linear(x, self._qkv[i]).view(b, q, nh + 2 * kvh, hd)
            qk = qkv[:, :, : nh + kvh]  # rotary on q and k at once
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            qs, ks, vs = qk[:, :, :nh], qk[:, :, nh:], qkv[:, :, nh + kvh :]
            kpool, vpool = self.k[i], self.v[i]  # [blocks, bs, KVH, D]
            kpool.view(kv_shape).index_copy_(0, flat, ks.reshape(kv_shape))
            vpool.view(kv_shape).index_copy_(0, flat, vs.reshape(kv_shape))
            # whole blocks: one contiguous copy each, [B, KVH, L, D] after
            kc = kpool.index_select(0, blocks).view(ctx_shape).transpose(1, 2)
            vc = vpool.index_select(0, blocks).view(ctx_shape).transpose(1, 2)
            o = sdpa(qs.transpose(1, 2), kc, vc, attn_mask=mask, enable_gqa=gqa)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, q, -1))
            gu = self._linear(self._norm(layer.post_attention_layernorm, h), self._gu[i])
            gate, up = gu.view(b, q, 2, -1).unbind(2)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        return self._norm(self.inner.norm, h)

    def _norm(self, norm: Any, x: Any) -> Any:
        """RMSNorm in one kernel (the model's module takes several)."""
        return self.torch.nn.functional.rms_norm(
            x, norm.weight.shape, norm.weight, norm.variance_epsilon
        )

    def _linear(self, x: Any, wb: tuple[Any, Any]) -> Any:
        return self.torch.nn.functional.linear(x, *wb)

    def logits(self, hidden: Any) -> Any:
        head = self.model.lm_head
        if self.kernel:
            return self._gemv.product(hidden, head.weight, head.bias, self.torch.float32)
        return head(hidden).float()

    # -- batches ----------------------------------------------------------------------------

    def prefill(
        self, batch: list[tuple[list[int], int, list[int]]], every: frozenset[int] = frozenset()
    ) -> tuple[Any, dict[int, Any]]:
        """Runs chunks: (token ids, position of the first, the sequence's block table) each.
        Returns the logits of each chunk's last token, [B, V], and for the rows in `every`
        the logits at every position of the chunk, [len(chunk), V] (prompt logprobs); their
        argmax goes to `last_ids` from `prefill_base`. On a GPU, without `every`, a captured
        graph per (chunks, longest chunk, blocks) bucket runs them."""
        n = len(batch)
        shape, graph = self.layout.chunk_shape(batch, bool(every))
        if graph:
            at, inputs = self.layout.stage_chunks(self._prefills.stage(), batch, shape)
            out = self._prefills.replay(shape, at, inputs, self._prefill_step, self.last_ids)
            return out[:n], {}
        t = [self.upload(x) for x in self.layout.chunk_inputs(batch, shape)]
        if not every:
            return self._prefill_step(*t), {}
        hidden = self._forward(*t[:4])
        logits_rows = {r: self.logits(hidden[r, : len(batch[r][0])]) for r in every}
        return self._last_logits(hidden, t[4]), logits_rows

    def _prefill_step(self, tok: Any, pos: Any, slot: Any, table: Any, last: Any) -> Any:
        """Prompt chunks from their inputs to their last tokens' logits and argmax (what a
        prefill graph captures)."""
        return self._last_logits(self._forward(tok, pos, slot, table), last)

    def _last_logits(self, hidden: Any, last: Any) -> Any:
        rows = self.torch.arange(hidden.shape[0], device=self.device)
        logits = self.logits(hidden[rows, last])
        base = self.prefill_base
        self.last_ids[base : base + logits.shape[0]].copy_(logits.argmax(-1))
        return logits

    def decode(self, batch: list[tuple[int, int, list[int]]], src: list[int] | None = None) -> Any:
        """One token each: (token id, its position, block table). Returns logits [B, V];
        their argmax goes to `last_ids[:B]`. A row whose `src` is not negative takes its
        token from `last_ids[src]` instead (sampled by the step before, not yet read)."""
        shape = self.layout.decode_shape(batch)
        if not self.layout.bucketed:
            tok, pos, slot, srcs, table = self.layout.decode_inputs(batch, src, shape)
            t = [self.upload(x)[:, None] for x in (tok, pos, slot, srcs)]  # [B, 1] each
            return self._decode_step(t[0], t[1], t[2], t[3], self.upload(table))
        at, inputs = self.layout.stage_decodes(self._decodes.stage(), batch, src, shape)
        out = self._decodes.replay(shape, at, inputs, self._decode_step, self.last_ids)
        return out[: len(batch)]

    def upload(self, x: list[Any], dtype: Any = None) -> Any:
        """A step's input (long unless `dtype`) on the device, from pinned memory: queued
        behind the step in flight, where a copy from pageable memory would wait for it."""
        t = self.torch.tensor(x, dtype=dtype or self.torch.long, pin_memory=self.cuda)
        return t.to(self.device, non_blocking=True)

    def _decode_step(self, tok: Any, pos: Any, slot: Any, src: Any, table: Any) -> Any:
        """A decode step from its inputs to its logits and argmax (what a graph captures)."""
        torch = self.torch
        tok = torch.where(src >= 0, self.last_ids[src.clamp(min=0)], tok)
        logits = self.logits(self._forward(tok, pos, slot, table)[:, 0])
        self.last_ids[: logits.shape[0]].copy_(logits.argmax(-1))
        return logits

    def fetch_ids(self) -> int:
        """Starts copying the steps' argmax (`last_ids`) to the host; `ids` waits for it."""
        k = self._flip = 1 - self._flip
        self._host[k].copy_(self.last_ids, non_blocking=True)
        if self._events[k] is not None:
            self._events[k].record()
        return k

    def ids(self, k: int) -> list[int]:
        if self._events[k] is not None:
            self._events[k].synchronize()
        return self._host[k].tolist()

    # -- moving KV in and out ---------------------------------------------------------------

    def read(self, blocks: list[int], n: int) -> list[Any]:
        """The K and V of positions [0, n) of a sequence, per layer ([n, KVH, D] each)."""
        torch = self.torch
        idx = torch.tensor(self.layout.slots(blocks, 0, n), dtype=torch.long, device=self.device)
        out = []
        shape = (-1, self.kv_heads, self.head_dim)
        for i in range(self.layers):
            out.append(self.k[i].view(shape)[idx])
            out.append(self.v[i].view(shape)[idx])
        return out

    def write(self, blocks: list[int], tensors: list[Any]) -> None:
        """Puts K/V read by `read` (from this or another engine) into `blocks`."""
        torch = self.torch
        n = tensors[0].shape[0]
        idx = torch.tensor(self.layout.slots(blocks, 0, n), dtype=torch.long, device=self.device)
        shape = (-1, self.kv_heads, self.head_dim)
        for i in range(self.layers):
            self.k[i].view(shape).index_copy_(0, idx, tensors[2 * i].to(self.device))
            self.v[i].view(shape).index_copy_(0, idx, tensors[2 * i + 1].to(self.device))
