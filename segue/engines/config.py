"""Which engine a worker runs, and the option groups of the real engines: the options every
engine shares (no prefix), hf's (`--hf-*`) and vLLM's (`--vllm-*`); the mocker's group is
`MockerConfig` (`--mocker-*`). Flags older than the groups stay as aliases."""

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
    """Options the hf and vLLM engines share."""

    max_num_seqs: int = option(8, help="hf/vllm: most sequences running at once")
    max_num_batched_tokens: int | None = option(
        None,
        help="hf/vllm: prompt tokens one engine step may compute; a longer prompt is "
        "prefilled in chunks (hf: 2048, vLLM: its default, when unset)",
    )


@dataclass(frozen=True)
class HFOptions:
    kv_blocks: int = option(4096, help="KV cache blocks", aliases=("--kv-blocks",))
    device: str = option("auto", help="cpu, cuda or auto", aliases=("--device",))
    dtype: str = option(
        "float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights and KV cache",
        aliases=("--dtype",),
    )
    cuda_graphs: bool = option(
        True, help="replay decode steps as CUDA graphs on a GPU", aliases=("--cuda-graphs",)
    )
    prefix_caching: bool = option(
        True, help="keep full KV blocks cached after their request and reuse them (true/false)"
    )
    kernels: str = option(
        "auto",
        choices=("auto", "torch", "triton"),
        help="segue's Triton kernels (decode attention reading the paged KV pool in place, "
        "fused norms, rotary and activation), PyTorch's ops, or auto (Triton on a GPU)",
    )
    overlap: str = option(
        "auto",
        choices=("auto", "on", "off"),
        help="launch each step before handling the one before it, so the GPU never waits "
        "for the CPU (steps of requests without logprobs, penalties or grammars); "
        "auto: on a GPU",
    )


@dataclass(frozen=True)
class VllmOptions:
    kv_connector: KvConnector = option(
        KvConnector.EXAMPLE,
        help="vLLM's KV connector for prefill/decode workers (nixl: "
        "see docs/operations.md for its state on CPU)",
    )
