"""The batched hf engine against transformers' batched `generate()`, same model, same device.

    python bench/engine_gpu.py                      # H200: 170M Llama, fp32 and bf16
    python bench/engine_gpu.py --device cpu --concurrency 1,8 --dtypes float32 \\
        --hidden-size 256 --layers 4 --heads 4 --baseline-tree /tmp/old-segue

For each dtype: `segue serve --engine hf --workers 1` on a random-weight Llama built by
`segue make-model`, driven by `segue bench --ignore-eos` (streaming completions, closed loop)
at each concurrency; then `generate()` of a batch of the same prompt, as many rows as the
concurrency, greedy, `--max-tokens` new tokens (the model's EOS never wins: make-model zeroes
its row). `--baseline-tree DIR` serves with the segue source in DIR too, each dtype right
after this tree's (an older engine, e.g. a `git worktree` of an earlier commit; it must take
`--dtype` and `--hf-kernels`). Prints tokens/s, TTFT and ITL p50 per level; `--json FILE`
writes every number. A long prompt's TTFT: `--prompt-words 4000 --context-length 8192
--concurrency 1`; sampled load (drawn on the GPU): `--temperature 0.8`. Every request sends
the same prompt unless `--distinct-prompts`: all but its last block is then a prefix-cache
hit, and a request's prompt step computes a few tokens, not all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, stop, wait_workers  # noqa: E402


def serve_and_bench(args, model: str, dtype: str, tree: str | None, tmp: Path) -> list[dict]:
    port = free_port()
    extra = ["--dtype", dtype, "--hf-kernels", args.kernels]
    log = open(tmp / f"serve-{dtype}-{'base' if tree else 'new'}.log", "w")
    argv = [
        "serve", "--engine", "hf", "--model", model, "--workers", "1",
        "--port", str(port), "--device", args.device,
        "--max-num-seqs", str(max(args.levels)), "--kv-blocks", str(args.kv_blocks),
        "--frontend-processes", str(args.frontend_processes), *extra,
    ]  # fmt: skip
    proc = spawn(argv, log, cwd=tree)  # from the baseline's tree: its package is found first
    url = f"http://127.0.0.1:{port}"
    try:
        wait_workers(url, 1, timeout=300)
        out = subprocess.run(
            [
                sys.executable, "-m", "segue", "bench", "--url", url, "--json", "--no-progress",
                "--concurrency", ",".join(map(str, args.levels)), "--ignore-eos",
                "--duration", str(args.duration), "--warmup", str(args.warmup),
                "--max-tokens", str(args.max_tokens), "--prompt-tokens", str(args.prompt_words),
                *(["--temperature", str(args.temperature)] if args.temperature else []),
                "--processes", str(args.bench_processes),
                *(["--distinct-prompts"] if args.distinct_prompts else []),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout)
    finally:
        stop([proc])


def bench_generate(args, model: str, dtype: str, ids: list[int]) -> dict[int, float]:
    """tokens/s of `generate()` at each batch size (rows of the same prompt)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    for b in args.levels:
        x = torch.tensor([ids] * b, device=device)
        kw = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False)
        with torch.inference_mode():
            m.generate(x, max_new_tokens=4, do_sample=False)  # warm up
            sync()
            t = time.perf_counter()
            y = m.generate(x, **kw)
            sync()
            dt = time.perf_counter() - t
        out[b] = b * (y.shape[1] - len(ids)) / dt
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (default: make one with the sizes below)")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--context-length", type=int, default=2048, help="make-model's")
    p.add_argument("--kernels", default="auto", help="the hf engine's --hf-kernels")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampled load (segue bench's flag)"
    )
    p.add_argument(
        "--bench-processes",
        type=int,
        default=4,
        help="segue bench's client processes (one reads ~80,000 streamed events/s on a "
        "fast core: at 256 fast streams one may be the limit)",
    )
    p.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="a fresh prompt per request (segue bench's flag): no prefix-cache hits",
    )
    p.add_argument("--kv-blocks", type=int, default=8192)
    p.add_argument(
        "--frontend-processes", type=int, default=1, help="frontend processes (serve's flag)"
    )
    p.add_argument("--baseline-tree", help="also serve with the segue source in this directory")
    p.add_argument("--no-generate", action="store_true", help="skip transformers generate()")
    p.add_argument("--json", help="write all results to this file")
    args = p.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="segue-bench-gpu-") as d:
        tmp = Path(d)
        model = args.model
        if model is None:
            model = str(tmp / "model")
            subprocess.run(
                [
                    sys.executable, "-m", "segue", "make-model", model,
                    "--hidden-size", str(args.hidden_size), "--layers", str(args.layers),
                    "--heads", str(args.heads), "--vocab-size", str(args.vocab_size),
                    "--context-length", str(args.context_length),
                    *(["--kv-heads", str(args.kv_heads)] if args.kv_heads else []),
                    *(["--intermediate-size", str(args.intermediate_size)]
                      if args.intermediate_size else []),
                ],
                check=True,
            )  # fmt: skip
        from segue.bench import _WORDS
        from segue.tokenizer import HFTokenizer

        prompt = " ".join(_WORDS[i % len(_WORDS)] for i in range(args.prompt_words))
        ids = HFTokenizer(model).encode(prompt)
        print(f"prompt: {len(ids)} tokens, {args.max_tokens} new tokens per request")
        results: dict = {"prompt_tokens": len(ids), "runs": {}}
        runs = [(dt, None) for dt in args.dtypes.split(",")]
        if args.baseline_tree:
            runs = [r for dt, _ in runs for r in ((dt, None), (dt, args.baseline_tree))]
        for dtype, tree in runs:
            name = f"{'baseline' if tree else 'segue'} {dtype}"
            levels = serve_and_bench(args, model, dtype, tree, tmp)
            gen = {} if args.no_generate or tree else bench_generate(args, model, dtype, ids)
            results["runs"][name] = {"levels": levels, "generate_tokens_per_s": gen}
            print(f"\n{name}")
            print(f"{'conc':>6} {'tok/s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} "
                  f"{'errors':>7} {'generate() tok/s':>17}")  # fmt: skip
            for lv in levels:
                c = lv["concurrency"]
                g = gen.get(c)
                print(
                    f"{c:>6} {lv['output_tokens_per_s']:>10.0f} {lv['ttft_ms_p50']:>12.1f} "
                    f"{lv['itl_ms_p50']:>11.2f} {lv['errors']:>7} "
                    f"{'' if g is None else f'{g:.0f}':>17}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
