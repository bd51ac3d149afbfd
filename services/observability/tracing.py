"""OpenTelemetry traces: one message from the gRPC call, through Kafka, to every processor and
the ClickHouse insert. Off by default (``SWITCHBOARD_OTEL_EXPORTER`` = ``otlp`` or ``console``).

The shape:
- the ingress opens a SERVER span per call (child of the caller's ``traceparent`` metadata, if
  any); `traceparent_of` then returns that span's context, so the event written to Kafka carries
  it in its envelope and its ``traceparent`` header;
- each processor opens one CONSUMER span per batch (``<processor> process``) linked to every
  record's context (messaging conventions for batches), and, for each record that carries a
  traceparent, a ``<processor> receive`` span that is the record's child and links back to the
  batch span; so the message's own trace lists every processor that applied it;
- the projector's ClickHouse inserts are children of its batch span (``clickhouse insert``).

When tracing is off every helper here returns before touching OpenTelemetry: a flag test per
call or per batch is the whole cost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from services.settings import Settings
    from streams._consumer import Record

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# A batch span links to at most this many records (a projector batch can hold thousands).
MAX_LINKS = 128

_state: dict[str, Any] = {"tracer": None}


def enabled() -> bool:
    return _state["tracer"] is not None


def configure(settings: Settings, service_name: str) -> None:
    """Turn tracing on for this process if the settings ask for an exporter (idempotent)."""
    if enabled() or not settings.otel_exporter:
        return
    exporter: SpanExporter
    if settings.otel_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint)
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    use_exporter(exporter, service_name, settings.otel_sample_ratio, batch=True)
    log.info("tracing on: %s exporter", settings.otel_exporter)


def use_exporter(exporter: SpanExporter, service_name: str, ratio: float = 1.0, *, batch: bool) -> Any:
    """Trace this process into `exporter` (tests pass an in-memory one with batch=False)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    # Our own provider, not the global one: a library in the process cannot replace it.
    _state["tracer"] = provider.get_tracer("switchboard")
    _state["provider"] = provider
    return provider


def disable() -> None:
    provider = _state.get("provider")
    if provider is not None:
        provider.shutdown()
    _state.update(tracer=None, provider=None)


def context_of(traceparent: str) -> Any:
    """An OpenTelemetry context from a W3C traceparent ('' or invalid: an empty context)."""
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def current_traceparent() -> str:
    """The W3C traceparent of the current span ('' when there is none)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


# --- ingress ------------------------------------------------------------------------------------


@contextlib.contextmanager
def server_span(method: str, context: Any) -> Iterator[None]:
    tracer = _state["tracer"]
    if tracer is None:
        yield
        return
    parent = ""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str):
            parent = value
    with tracer.start_as_current_span(
        method.lstrip("/"),
        context=context_of(parent),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": method},
    ):
        yield


def traceparent_of(context: Any) -> str:
    """The traceparent an event written by this call carries: the call's span when tracing is
    on, else what the caller sent (the ingress's own `traceparent_of`)."""
    if _state["tracer"] is not None:
        current = current_traceparent()
        if current:
            return current
    from services.ingress._service import traceparent_of as from_metadata

    return from_metadata(context)


# --- processors ---------------------------------------------------------------------------------


def _record_traceparent(record: Record) -> str:
    for key, value in record.headers:
        if key == "traceparent":
            return value.decode("ascii", "replace")
    return ""


@contextlib.contextmanager
def batch_span(processor: str, records: Sequence[Record]) -> Iterator[None]:
    tracer = _state["tracer"]
    if tracer is None:
        yield
        return
    contexts = []
    for record in records:
        parent = _record_traceparent(record)
        if parent:
            span_context = trace.get_current_span(context_of(parent)).get_span_context()
            if span_context.is_valid:
                contexts.append((record, parent, span_context))
    with tracer.start_as_current_span(
        f"{processor} process",
        kind=SpanKind.CONSUMER,
        links=[Link(c) for _, _, c in contexts[:MAX_LINKS]],
        attributes={"messaging.system": "kafka", "messaging.batch.message_count": len(records)},
    ) as batch:
        started = batch.start_time if hasattr(batch, "start_time") else None
        try:
            yield
        finally:
            link = Link(batch.get_span_context())
            for record, parent, _ in contexts:
                span = tracer.start_span(
                    f"{processor} receive",
                    context=context_of(parent),
                    kind=SpanKind.CONSUMER,
                    links=[link],
                    start_time=started,
                    attributes={
                        "messaging.system": "kafka",
                        "messaging.destination.name": record.topic,
                        "messaging.destination.partition.id": str(record.partition),
                        "messaging.kafka.offset": record.offset,
                    },
                )
                span.end()


@contextlib.contextmanager
def insert_span(table: str, rows: int) -> Iterator[None]:
    tracer = _state["tracer"]
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(
        "clickhouse insert",
        kind=SpanKind.CLIENT,
        attributes={"db.system": "clickhouse", "db.collection.name": table, "db.rows": rows},
    ):
        yield
