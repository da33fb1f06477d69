"""The frontend's options: one definition for its CLI flags and for `segue serve`."""

from __future__ import annotations

import os
from dataclasses import dataclass

from segue.disagg import PrefillFallback, Strategy
from segue.frontend.tool_calls import ToolParser
from segue.options import option
from segue.protocol import PlaneKind
from segue.router import Policy


@dataclass(frozen=True)
class FrontendConfig:
    host: str = option("127.0.0.1", help="address to bind")
    port: int = option(8000, help="port to bind (0: any free port)")
    discovery: str = option("", required=True, help="file:DIR or etcd://HOST:PORT[,...]")
    cluster_token_file: str | None = option(
        None,
        help="file with the cluster token sent on every call to a worker (or $SEGUE_CLUSTER_TOKEN)",
    )
    namespace: str = option("default", help="deployment name inside the discovery store")
    model: str | None = option(None, help="Hugging Face model directory (tokenizer)")
    model_name: str | None = option(
        None, help="served model name (default: the model directory's name)"
    )
    router: Policy = option(Policy.ROUND_ROBIN, help="how a worker is picked")
    tool_call_parser: ToolParser = option(
        ToolParser.HERMES, help="how tool calls are read out of a chat answer that has tools"
    )
    kv_overlap_weight: float = option(
        1.0, help="--router kv: cost per context token a worker would have to prefill"
    )
    kv_load_weight: float = option(
        0.1,
        help="--router kv: cost per context token of the calls in flight on a worker (a "
        "token in flight slows decode steps far less than a token to prefill costs)",
    )
    request_plane: PlaneKind = option(
        PlaneKind.MUX,
        help="how calls reach workers: mux (all calls to a worker on one WebSocket) or "
        "http (one POST per call)",
    )
    migration_limit: int = option(3, help="times one request may move to another worker")
    stall_timeout: float = option(
        5.0, help="seconds without any frame from a worker before it counts as hung"
    )
    request_timeout: float | None = option(
        None, help="default per-request deadline in seconds (none by default)"
    )
    disagg_strategy: Strategy = option(
        Strategy.NONE, help="disaggregated prefill/decode: who chains the stages"
    )
    prefill_fallback: PrefillFallback = option(
        PrefillFallback.NONE, help="with no prefill worker left, prefill on the decode worker"
    )
    max_body_bytes: int = option(4 * 1024 * 1024, help="largest request body accepted")
    body_timeout: float = option(
        30.0, help="seconds a client may take to send a request body (408 beyond)"
    )
    default_max_tokens_chat: int = option(1024, help="max_tokens of a chat request without one")
    default_max_tokens_completion: int = option(
        16, help="max_tokens of a completion request without one"
    )
    shutdown_grace: float = option(30.0, help="seconds open streams may finish on SIGTERM")
    otlp_traces_endpoint: str | None = option(
        None,
        help="export OpenTelemetry traces here (OTLP over HTTP, e.g. "
        "http://127.0.0.1:4318/v1/traces); off when unset",
    )
    max_connections: int = option(1024, help="open connections to workers, at most")
    max_client_connections: int = option(
        10000,
        help="open client connections, at most; past it a new one gets 503 and is closed "
        "(0: no limit)",
    )
    header_timeout: float = option(
        30.0,
        help="seconds a client connection has to send a request's headers, from opening or "
        "from its previous response (0: no limit)",
    )
    max_client_buffer: int = option(
        1024 * 1024,
        help="bytes of a stream a client may leave unread (beyond the kernel's buffers) before "
        "its request is cancelled like a disconnect: a client that stops reading must not "
        "hold a worker's KV",
    )
    max_inflight: int = option(
        4096,
        help="generation requests this process serves at once; over it a new one gets 503 "
        "with Retry-After at once (0: no limit)",
    )
    api_key_file: str | None = option(
        None,
        help="client API keys, one per line (reloaded on SIGHUP): requests need "
        "`Authorization: Bearer KEY`; /health and /live stay open",
    )
    protect_metrics: bool = option(
        False, help="with --api-key-file, require a key on /metrics too (true/false)"
    )
    processes: int = option(
        1,
        help="frontend processes serving one port, each routing on its own (use the cores)",
        aliases=("--frontend-processes",),
    )
    system_port: int | None = option(
        None,
        help="also serve /live, /health and /metrics on this port from a thread of their "
        "own: they answer at once under any load, and /live there is 503 when the event "
        "loop stalls (0: any free port; every --processes child binds it)",
    )
    store: str = option(
        "",
        help="the Responses API's store: redis://HOST:PORT/DB (frontends on several "
        "machines) or sqlite:PATH, a file every frontend process of one host may share "
        "(default: segue-responses.sqlite3 in the temp directory)",
    )
    store_ttl: float = option(86400.0, help="seconds a stored response is kept (the Responses API)")
    listen_fd: int | None = option(None, hidden=True, help="a listening socket (from --processes)")

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return os.path.basename(os.path.normpath(self.model)) if self.model else "segue-mocker"
