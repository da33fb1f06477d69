"""OpenTelemetry traces (`--otlp-traces-endpoint URL`, OTLP over HTTP/protobuf).

Off by default: `tracer` stays None, the SDK is never imported, and each hook in the request
path is one branch. On, a frontend opens a span per HTTP request (continuing the client's W3C
`traceparent`), a child span per attempt on a worker (how it ended; migrations and the
client's cancellation are events), and carries the attempt's `traceparent` to the worker in
the `EngineRequest`; the worker opens a span per call under it (its stage, the first token,
a KV transfer and its bytes, detach and attach as events) and passes its own on to the remote
stage it calls in a disaggregated deployment. Spans are exported in batches off the event
loop (the SDK's thread; OTEL_BSP_* variables tune it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

tracer: Any = None  # the SDK's tracer once setup() was given an endpoint
_provider: Any = None
# the span of the call (worker) or request (frontend) being served: for events deep in the
# stack and for the trace ids of JSON log lines
current: ContextVar[Any] = ContextVar("segue_span", default=None)


def setup(endpoint: str | None, service: str) -> None:
    global tracer, _provider
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    # batches every OTEL_BSP_SCHEDULE_DELAY ms (the SDK's default, 5000): each export is an
    # HTTP POST of protobuf encoded on the SDK's thread, a cost per batch, not per span
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=5)
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = _provider.get_tracer("segue")


def shutdown() -> None:
    """Exports what is left (at process exit)."""
    if _provider is not None:
        _provider.shutdown()


def start(
    name: str, parent: Any, attributes: dict[str, Any] | None = None, server: bool = False
) -> Any:
    """A span under `parent`: a span, a `traceparent` string, or HTTP headers (the
    client's W3C trace context); none or an empty one starts a trace."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if parent is None or isinstance(parent, str | Mapping):
        carrier: Mapping[str, str] = (
            {"traceparent": parent} if isinstance(parent, str) else (parent or {})
        )
        ctx = TraceContextTextMapPropagator().extract(carrier)
    else:
        ctx = trace.set_span_in_context(parent)
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    return tracer.start_span(name, context=ctx, kind=kind, attributes=_clean(attributes or {}))


def traceparent(span: Any) -> str:
    """The W3C `traceparent` that makes a remote span a child of `span`."""
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{c.trace_flags:02x}"


def ids(span: Any) -> tuple[str, str]:
    c = span.get_span_context()
    return f"{c.trace_id:032x}", f"{c.span_id:016x}"


def event(name: str, attributes: dict[str, Any] | None = None) -> None:
    """An event on the current span, if there is one."""
    span = current.get()
    if span is not None:
        span.add_event(name, _clean(attributes or {}))


def fail(span: Any, description: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


class RequestTrace:
    """A frontend request's span and its attempts' (one choice's; `n` choices share the
    request span)."""

    __slots__ = ("span", "start", "first_token")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.start = time.perf_counter()
        self.first_token = False

    def attempt(self, worker: str, role: str, phase: str) -> Any:
        return start(
            "segue.attempt",
            self.span,
            {"segue.worker.id": worker, "segue.worker.role": role, "segue.phase": phase},
        )

    def token(self) -> None:
        if not self.first_token:
            self.first_token = True
            ttft = time.perf_counter() - self.start
            self.span.set_attribute("gen_ai.latency.time_to_first_token", ttft)
            self.span.add_event("first_token")
