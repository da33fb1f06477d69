"""Engines behind one interface (`segue.engines.base.Engine`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from segue.engines.base import Engine, EngineInput, EngineOutput, RequestStream
from segue.engines.config import EngineName

if TYPE_CHECKING:
    from segue.tokenizer import Tokenizer
    from segue.worker.config import WorkerConfig

__all__ = ["Engine", "EngineInput", "EngineOutput", "RequestStream", "create_engine"]


def create_engine(cfg: WorkerConfig, tokenizer: Tokenizer) -> Engine:
    opts = cfg.engine_options
    if cfg.engine is EngineName.MOCKER:
        from segue.engines.mocker import MockerEngine

        return MockerEngine(cfg.mocker, tokenizer)
    if not cfg.model:
        raise ValueError(f"--engine {cfg.engine} needs --model DIR (see `segue make-model`)")
    if cfg.engine is EngineName.HF:
        from segue.engines.hf import HFConfig, HFEngine

        return HFEngine(
            HFConfig(
                model_dir=cfg.model,
                max_num_seqs=opts.max_num_seqs,
                kv_blocks=opts.kv_blocks,
                device=opts.device,
                dtype=opts.dtype,
                max_model_len=tokenizer.context_length,
                max_batched_tokens=opts.max_num_batched_tokens or 2048,
                cuda_graphs=opts.cuda_graphs,
            ),
            tokenizer,
        )
    from segue.engines.vllm import VllmConfig, VllmEngine

    return VllmEngine(
        VllmConfig(
            model_dir=cfg.model,
            max_num_seqs=opts.max_num_seqs,
            max_model_len=tokenizer.context_length,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            role=cfg.role,
            kv_connector=opts.vllm_kv_connector,
            kv_ttl=cfg.kv_ttl,
            host=cfg.host,
        ),
        tokenizer,
    )
