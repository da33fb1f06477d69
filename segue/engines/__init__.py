"""Engines behind one interface (`segue.engines.base.Engine`)."""

from __future__ import annotations

from segue.engines.base import Engine, EngineOutput, RequestStream  # noqa: F401


def create_engine(name: str, args, tokenizer) -> Engine:
    if name == "mocker":
        from segue.engines.mocker import MockerConfig, MockerEngine

        return MockerEngine(MockerConfig.from_args(args), tokenizer)
    if name == "hf":
        from segue.engines.hf import HFConfig, HFEngine

        if not args.model:
            raise ValueError("--engine hf needs --model DIR (see `segue make-model`)")
        return HFEngine(HFConfig(model_dir=args.model, max_num_seqs=args.max_num_seqs,
                                 kv_blocks=args.kv_blocks, device=args.device), tokenizer)
    if name == "vllm":
        from segue.engines.vllm import VllmConfig, VllmEngine

        if not args.model:
            raise ValueError("--engine vllm needs --model DIR (see `segue make-model`)")
        return VllmEngine(VllmConfig(model_dir=args.model, max_num_seqs=args.max_num_seqs,
                                     max_model_len=tokenizer.context_length,
                                     max_num_batched_tokens=args.max_num_batched_tokens,
                                     role=args.role, kv_connector=args.vllm_kv_connector,
                                     kv_ttl=args.kv_ttl, host=args.host), tokenizer)
    raise ValueError(f"unknown engine {name!r} (available: mocker, hf, vllm)")
