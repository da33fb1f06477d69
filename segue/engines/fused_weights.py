"""One weight for a Llama layer's q, k and v projections and one for its MLP's gate and up
projections: one matrix product each instead of three and two. The model's own parameters
become views into them, so nothing is stored twice and the model still runs as loaded. The
MLP's fused output splits by a view: gate and up as `[..., 2, I]`."""

from __future__ import annotations

from typing import Any

Weights = tuple[Any, Any]  # (weight, bias or None), as `torch.nn.functional.linear` takes


def fuse_projections(torch: Any, layers: Any) -> tuple[list[Weights], list[Weights]]:
    """Per layer, (q|k|v weights) and (gate|up weights)."""
    qkv: list[Weights] = []
    gate_up: list[Weights] = []
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj)
        w = torch.cat([p.weight.data for p in projs])
        bias = None
        if a.q_proj.bias is not None:
            bias = torch.cat([p.bias.data for p in projs])
        at = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight.data = w[at : at + n]
            if bias is not None:
                p.bias.data = bias[at : at + n]
            at += n
        qkv.append((w, bias))
        inter = m.gate_proj.weight.shape[0]
        gu = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
        m.gate_proj.weight.data, m.up_proj.weight.data = gu[:inter], gu[inter:]
        gate_up.append((gu, None))
    return qkv, gate_up
