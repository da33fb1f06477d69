"""A worker's options: one definition for its CLI flags and for `segue serve`."""

from __future__ import annotations

from dataclasses import dataclass

from segue.disagg import PrefillFallback
from segue.engines.config import EngineName, EngineOptions, HFOptions, VllmOptions
from segue.engines.mocker import MockerConfig
from segue.options import option
from segue.protocol import PlaneKind, Role


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineName = option(EngineName.MOCKER, help="the engine behind this worker")
    model: str | None = option(None, help="Hugging Face model directory")
    model_name: str | None = option(
        None, help="served model name (default: the model directory's name)"
    )
    role: Role = option(Role.AGGREGATED, help="aggregated, or a disaggregated stage")
    discovery: str = option("", required=True, help="file:DIR or etcd://HOST:PORT[,...]")
    namespace: str = option("default", help="deployment name inside the discovery store")
    host: str = option("127.0.0.1", help="address to bind")
    advertise_host: str | None = option(
        None,
        help="address published in discovery (default: the bound one; with 0.0.0.0, the "
        "first non-loopback address)",
    )
    cluster_token_file: str | None = option(
        None,
        help="file with the cluster token every request-plane call must carry (or "
        "$SEGUE_CLUSTER_TOKEN)",
    )
    port: int = option(0, help="port to bind (0: any free port)")
    replicas: int = option(
        1,
        help="mocker workers this process runs, each a worker of its own to everything "
        "outside (id, lease, card, port, engine): a simulated fleet on one machine",
    )
    drain_timeout: float = option(
        30.0, help="seconds in-flight requests may finish on SIGTERM before they are handed back"
    )
    otlp_traces_endpoint: str | None = option(
        None,
        help="export OpenTelemetry traces here (OTLP over HTTP, e.g. "
        "http://127.0.0.1:4318/v1/traces); off when unset",
    )
    detach_grace: float = option(
        10.0,
        help="seconds a request that may be re-attached (a background response) keeps "
        "running after its caller's connection broke (its frontend died), for the frontend "
        "that takes it over to attach to it (0: abort at once, as any other)",
    )
    keepalive: float = option(
        0.5, help="seconds between keep-alive frames while a request makes no tokens"
    )
    lease_ttl: float = option(
        10.0,
        help="seconds a worker stays listed after its last lease renewal (a dead local "
        "process is dropped at once; a failed call takes a worker out of rotation at once)",
    )
    stall_timeout: float = option(
        5.0, help="seconds without a frame from a remote stage before it counts as hung"
    )
    max_pending: int = option(
        1024,
        help="calls this worker holds at once (running and queued in its engine); over it a "
        "new call gets a retryable `overloaded` error at once and its caller tries another",
    )
    max_pending_kv: float = option(
        4.0,
        help="KV the calls this worker holds may need together (prompt + max_tokens each), "
        "as a multiple of its engine's KV cache; over it a new call gets `overloaded` as "
        "over --max-pending (0: no limit)",
    )
    request_plane: PlaneKind = option(
        PlaneKind.MUX,
        help="how this worker calls remote stages: mux (all calls to a worker on one "
        "WebSocket) or http (one POST per call)",
    )
    caller_timeout: float = option(
        10.0,
        help="seconds a caller may leave our frames unacknowledged before it counts as "
        "gone and its requests are aborted (TCP_USER_TIMEOUT; a partitioned caller sends no "
        "FIN; 0: the kernel's default, many minutes)",
    )
    kv_ttl: float = option(
        30.0, help="seconds a prefilled KV payload waits for its pull before it is freed"
    )
    prefill_fallback: PrefillFallback = option(
        PrefillFallback.NONE, help="decode worker: prefill locally when no prefill worker is left"
    )
    engine_stall_timeout: float = option(
        120.0,
        help="seconds the engine may make no progress at all (no token, no finish) "
        "while it holds requests before the worker declares it hung: the requests fail "
        "over, the worker leaves discovery and exits 3 (0: never)",
    )
    # Fault injection for tests: the process dies (os._exit) right after it has sent the
    # token at this offset of a client's output, before any final frame.
    fault_exit_after_tokens: int | None = option(None, hidden=True, help="fault injection")
    # the engines' option groups (segue.engines.registry builds the engine from them)
    engine_options: EngineOptions = option(default_factory=EngineOptions, prefix="", help="")
    mocker: MockerConfig = option(default_factory=MockerConfig, prefix="mocker", help="")
    hf: HFOptions = option(default_factory=HFOptions, prefix="hf", help="")
    vllm: VllmOptions = option(default_factory=VllmOptions, prefix="vllm", help="")

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] if self.model else "segue-mocker"
