"""The hf engine's decode step on a GPU, alone: its captured CUDA graph replayed, against
the floor (the model's weight bytes over the GPU's measured copy bandwidth), for PyTorch's ops
(SDPA over gathered blocks) and segue's Triton kernels side by side.

    python bench/engine_step.py                     # the issue's models, bf16
    python bench/engine_step.py --models 1b-mha --batches 1,64 --context 150

Models are random-weight Llamas built in memory (no tokenizer needed): `1b-mha` (hidden
2048, 24 layers, 16 heads), `1b-gqa` (Llama-3.2-1B's body: 16 layers, 32 heads, 8 KV
heads, MLP 8192, a 1,032-entry vocabulary) and `1b-gqa-128k` (the same with its 128,256
entries). Every sequence has `--context` tokens of KV; each timing is the mean of
`--replays` replays after a warm-up, measured with CUDA events.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    "1b-mha": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=16, intermediate_size=4096, vocab_size=1032),
    "1b-gqa": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=8192, vocab_size=1032),
    "1b-gqa-128k": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
}  # fmt: skip


def copy_bandwidth(torch) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted once:
    what a step that reads its weights once is bound by)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del a, b
    return 2 * (1 << 30) / seconds


def step_ms(torch, paged, batch: int, context: int, replays: int) -> float:
    bs = paged.block_size
    per = -(-(context + 1) // bs)
    rows = [(7, context, list(range(i * per, (i + 1) * per))) for i in range(batch)]
    paged.decode(rows)  # captures this bucket's graph
    graph = paged._decodes.graph(paged.layout.decode_shape(rows))
    for _ in range(3):
        graph.replay()
    return replay_ms(torch, graph, replays)


def replay_ms(torch, graph, replays: int) -> float:
    """GPU milliseconds a replay of a captured graph, the mean of `replays` (CUDA events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def profile(torch, paged, batch: int, context: int) -> None:
    """The kernels of one decode step run eagerly (what the graph replays)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    paged.layout.bucketed = False
    per = -(-(context + 1) // paged.block_size)
    rows = [(7, context, list(range(i * per, (i + 1) * per))) for i in range(batch)]
    with torch.inference_mode():
        paged.decode(rows)
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            paged.decode(rows)
            torch.cuda.synchronize()
    events = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"    {len(events)} kernels in one step at batch {batch}")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    paged.layout.bucketed = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--context", type=int, default=150)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--kernels", default="torch,triton")
    p.add_argument("--profile", action="store_true", help="also list one step's kernels")
    a = p.parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from segue.engines.paged import PagedModel

    batches = [int(b) for b in a.batches.split(",")]
    bw = copy_bandwidth(torch)
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s")
    for name in a.models.split(","):
        cfg = LlamaConfig(**MODELS[name], max_position_embeddings=4096, tie_word_embeddings=False)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        weights = sum(t.numel() * t.element_size() for t in model.parameters())
        floor = 1000 * weights / bw
        print(f"\n{name}: {weights / 1e9:.2f} GB of weights, floor {floor:.3f} ms per step")
        per = -(-(a.context + 1) // 16)
        for kernels in a.kernels.split(","):
            paged = PagedModel(model, per * max(batches), 16, per + 1, max(batches), True,
                               kernels=kernels)  # fmt: skip
            with torch.inference_mode():
                times = [step_ms(torch, paged, b, a.context, a.replays) for b in batches]
            pairs = zip(batches, times, strict=True)
            cells = ", ".join(f"batch {b} {t:.3f} ms ({t / floor:.1f}x)" for b, t in pairs)
            print(f"  {kernels:>14}: {cells}")
            if a.profile:
                profile(torch, paged, min(batches), a.context)
            del paged
            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
