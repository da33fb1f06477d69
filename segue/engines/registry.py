"""The table of engines: one row per `--engine` name, each a factory that builds the engine
from the worker's config (its own option group there) and the tokenizer. Adding an engine:
its module, its option group on `WorkerConfig`, a name and a row here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from segue.engines.base import Engine
from segue.engines.config import EngineName
from segue.tokenizer import Tokenizer
from segue.worker.config import WorkerConfig


def _mocker(cfg: WorkerConfig, tok: Tokenizer) -> Engine:
    from segue.engines.mocker import MockerEngine

    return MockerEngine(cfg.mocker, tok)


def _hf(cfg: WorkerConfig, tok: Tokenizer) -> Engine:
    from segue.engines.hf import HFConfig, HFEngine

    assert cfg.model is not None
    opts, hf = cfg.engine_options, cfg.hf
    return HFEngine(
        HFConfig(
            model_dir=cfg.model,
            max_num_seqs=opts.max_num_seqs,
            kv_blocks=hf.kv_blocks,
            device=hf.device,
            dtype=hf.dtype,
            max_model_len=tok.context_length,
            max_batched_tokens=opts.max_num_batched_tokens or 2048,
            cuda_graphs=hf.cuda_graphs,
            kernels=hf.kernels,
            overlap=hf.overlap,
            prefix_caching=hf.prefix_caching,
        ),
        tok,
    )


def _vllm(cfg: WorkerConfig, tok: Tokenizer) -> Engine:
    from segue.engines.vllm import VllmConfig, VllmEngine

    assert cfg.model is not None
    opts = cfg.engine_options
    return VllmEngine(
        VllmConfig(
            model_dir=cfg.model,
            max_num_seqs=opts.max_num_seqs,
            max_model_len=tok.context_length,
            max_num_batched_tokens=opts.max_num_batched_tokens,
            role=cfg.role,
            kv_connector=cfg.vllm.kv_connector,
            kv_ttl=cfg.kv_ttl,
            host=cfg.host,
        ),
        tok,
    )


@dataclass(frozen=True)
class EngineSpec:
    make: Callable[[WorkerConfig, Tokenizer], Engine]
    needs_model: bool  # a model directory (--model)


ENGINES: dict[EngineName, EngineSpec] = {
    EngineName.MOCKER: EngineSpec(_mocker, needs_model=False),
    EngineName.HF: EngineSpec(_hf, needs_model=True),
    EngineName.VLLM: EngineSpec(_vllm, needs_model=True),
}


def create_engine(cfg: WorkerConfig, tokenizer: Tokenizer) -> Engine:
    spec = ENGINES[cfg.engine]
    if spec.needs_model and not cfg.model:
        raise ValueError(f"--engine {cfg.engine} needs --model DIR (see `segue make-model`)")
    return spec.make(cfg, tokenizer)
