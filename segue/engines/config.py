"""Which engine a worker runs, and the options of the real (hf, vllm) engines."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from segue.options import option


class EngineName(StrEnum):
    MOCKER = "mocker"
    HF = "hf"
    VLLM = "vllm"


class KvConnector(StrEnum):
    EXAMPLE = "example"
    NIXL = "nixl"


@dataclass(frozen=True)
class EngineOptions:
    max_num_seqs: int = option(8, help="hf/vllm: most sequences running at once")
    kv_blocks: int = option(4096, help="hf: KV cache blocks")
    device: str = option("auto", help="hf: cpu, cuda or auto")
    dtype: str = option(
        "float32", choices=("float32", "bfloat16", "float16"), help="hf: weights and KV cache"
    )
    cuda_graphs: bool = option(True, help="hf: replay decode steps as CUDA graphs on a GPU")
    max_num_batched_tokens: int | None = option(
        None,
        help="hf/vllm: prompt tokens one engine step may compute; a longer prompt is "
        "prefilled in chunks (hf: 2048, vLLM: its default, when unset)",
    )
    vllm_kv_connector: KvConnector = option(
        KvConnector.EXAMPLE,
        help="vLLM's KV connector for prefill/decode workers (nixl: "
        "see docs/operations.md for its state on CPU)",
    )
