"""Prometheus metrics of every Switchboard process, and the hooks that feed them.

Each process serves its own ``/metrics`` on 127.0.0.1 (ports in settings: ``*_metrics_listen``).
The hooks are kept out of the hot paths' modules: the ingress gets a gRPC server interceptor and a
wrapper around its producer's ``enqueue``; `BatchConsumer` calls `batch_observed` once per batch
and registers itself for a scrape-time collector (lag, records, dead letters are read from the
consumer when Prometheus scrapes, so they cost nothing per message); the assistant's classifier,
knowledge search and gateway and the projector's ClickHouse client are wrapped once at start-up.

Per-message cost: the interceptor and the produce wrapper add a few microseconds per RPC
(labelled children are cached; no lock beyond prometheus_client's own); everything else is per
batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.observability import tracing

if TYPE_CHECKING:
    from services.settings import Settings
    from streams._consumer import BatchConsumer, Record

log = logging.getLogger(__name__)

# Latency buckets in seconds: sub-millisecond acks up to multi-second model calls.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)

GRPC_REQUESTS = Counter(
    "switchboard_grpc_requests_total", "gRPC calls handled, by method and status code", ["method", "code"]
)
GRPC_SECONDS = Histogram(
    "switchboard_grpc_request_seconds",
    "gRPC call duration (streams: the whole call), by method and status code",
    ["method", "code"],
    buckets=_LATENCY,
)
PRODUCE_SECONDS = Histogram(
    "switchboard_produce_seconds",
    "Time from handing an event to the Kafka producer to Kafka's ack (or failure)",
    ["outcome"],
    buckets=_LATENCY,
)
INFLIGHT_WRITES = Gauge(
    "switchboard_inflight_writes", "Produce requests awaiting a Kafka ack", multiprocess_mode="livesum"
)
BATCH_SECONDS = Histogram(
    "switchboard_batch_processing_seconds",
    "Time to apply one batch (until durable) and commit it, per processor",
    ["processor"],
    buckets=_LATENCY,
)
BATCH_RECORDS = Histogram(
    "switchboard_batch_records", "Records per batch, per processor", ["processor"], buckets=_BATCH
)
MODEL_SECONDS = Histogram(
    "switchboard_model_inference_seconds",
    "Model inference time per call (intent: one batch of messages; retrieval: one question)",
    ["model"],
    buckets=_LATENCY,
)
GATEWAY_CALLS = Counter(
    "switchboard_gateway_calls_total",
    "Model gateway attempts, by adapter and outcome (ok, timeout, error, skipped_open_circuit, ...)",
    ["adapter", "outcome"],
)
PROJECTOR_ROWS = Histogram(
    "switchboard_projector_insert_rows", "Rows per ClickHouse insert, by table", ["table"], buckets=_BATCH
)
PROJECTOR_INSERT_SECONDS = Histogram(
    "switchboard_projector_insert_seconds",
    "Time of one ClickHouse insert, by table",
    ["table"],
    buckets=_LATENCY,
)


# --- the HTTP endpoint --------------------------------------------------------------------------

# Processor name -> the role whose metrics address its process serves.
ROLES = {"sessions": "sessions", "assistant": "assistant", "projector": "analytics"}
# `switchboard ingress` with N processes: the children write their series to files here (set in
# their environment by the supervisor, before they import prometheus_client), and the supervisor
# serves the sum on the one ingress address.
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_served: dict[str, Any] = {}
_served_lock = threading.Lock()


def metrics_listen(settings: Settings, role: str) -> str:
    """The metrics address of a process role (ingress, sessions, assistant, analytics)."""
    return str(getattr(settings, f"{role}_metrics_listen", "") or "")


def serve_metrics(settings: Settings, role: str, *, child: bool = False, children: int = 1) -> str | None:
    """Serve this process's ``/metrics`` (once per process); returns the address or None.

    `child`: one of several processes of a supervisor, which serves their sum (nothing is served
    here). `children` > 1: this process is that supervisor. A port already taken is logged, not
    fatal: metrics never stop a process from working. Also configures tracing for the process
    (off unless settings.otel_exporter says otherwise)."""
    tracing.configure(settings, f"switchboard-{role}")
    address = metrics_listen(settings, role)
    if not address or child:
        return None
    registry: Any = REGISTRY
    if children > 1:
        registry = _multiprocess_registry(settings, role)
    with _served_lock:
        if _served:
            return str(_served["address"])
        host, port = address.rsplit(":", 1)
        try:
            server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            log.warning("metrics endpoint %s not served: %r", address, exc)
            return None
        _served.update(address=address, server=server, thread=thread)
    log.info("Prometheus metrics on http://%s/metrics", address)
    return address


def _multiprocess_registry(settings: Settings, role: str) -> Any:
    import atexit
    import os
    import shutil

    from prometheus_client import CollectorRegistry, multiprocess

    # A fresh directory per supervisor (files of a previous run would add to this one's sums),
    # removed when it exits; those of supervisors that died without exiting are removed here.
    root = settings.data_dir / "metrics"
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob(f"{role}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    directory = root / f"{role}-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    atexit.register(shutil.rmtree, directory, True)
    os.environ[_MULTIPROC_ENV] = str(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return registry


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- gRPC (ingress) -----------------------------------------------------------------------------

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _code_name(context: Any, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _CODE_NAMES.get(int(code), str(code))


class _Observed:
    """Per-method labelled children, cached: a dict lookup per call instead of `labels()`."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._by_code: dict[str, tuple[Any, Any]] = {}

    def record(self, code: str, seconds: float) -> None:
        pair = self._by_code.get(code)
        if pair is None:
            pair = self._by_code[code] = (
                GRPC_REQUESTS.labels(self.method, code),
                GRPC_SECONDS.labels(self.method, code),
            )
        pair[0].inc()
        pair[1].observe(seconds)


_MAX_CACHED_WRAPPERS = 4096


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every call by method and final status; opens the call's server span
    when tracing is on (its context becomes the events' traceparent)."""

    def __init__(self) -> None:
        self._methods: dict[str, _Observed] = {}
        # (method, id(handler)) -> (handler, its wrapper). The handler is kept and compared: an
        # id is only unique among live objects, and the interceptors behind this one return a new
        # handler per refused call; a freed one's id comes back for another key's handler.
        self._handlers: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        # One wrapped handler per (method, handler): built once, reused for every call.
        key = (method, id(handler))
        cached = self._handlers.get(key)
        if cached is not None and cached[0] is handler:
            return cached[1]
        observed = self._methods.get(method)
        if observed is None:
            observed = self._methods[method] = _Observed(method.rsplit("/", 1)[-1])
        wrapped = _wrap(handler, observed, method)
        if len(self._handlers) >= _MAX_CACHED_WRAPPERS:
            self._handlers.clear()  # bounded memory whatever callers send (refusals are per call)
        self._handlers[key] = (handler, wrapped)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, observed: _Observed, method: str) -> grpc.RpcMethodHandler:
    # Per call: two clock reads, the status, a cached counter and histogram; the span only when
    # tracing is on (checked without entering a context manager).
    tracer_state = tracing._state
    clock = time.perf_counter

    def unary(behaviour: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def call(request: Any, context: Any) -> Any:
            started = clock()
            try:
                if tracer_state["tracer"] is None:
                    response = await behaviour(request, context)
                else:
                    with tracing.server_span(method, context):
                        response = await behaviour(request, context)
            except BaseException:
                observed.record(_code_name(context, True), clock() - started)
                raise
            observed.record(_code_name(context, False), clock() - started)
            return response

        return call

    def streaming(behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        if not inspect.isasyncgenfunction(behaviour):
            # A coroutine that answers with `context.write()` (grpc_health's Watch): wrapped as
            # such; grpc.aio serves the two kinds differently.
            return unary(behaviour)

        async def call(request: Any, context: Any) -> AsyncIterator[Any]:
            started = clock()
            failed = True
            try:
                with tracing.server_span(method, context):
                    async for response in behaviour(request, context):
                        yield response
                failed = False
            finally:
                observed.record(_code_name(context, failed), clock() - started)

        return call

    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, unary),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, streaming),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, unary),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, streaming),
    )
    for attr, make, wrap in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def observe_producer(producer: Any) -> None:
    """Time every produce (enqueue to Kafka's ack) and follow the in-flight count of the
    ingress's `EventProducer` (wraps its `enqueue` on the instance)."""
    enqueue = producer.enqueue
    ok, failed = PRODUCE_SECONDS.labels("ok"), PRODUCE_SECONDS.labels("error")
    # The gauge is set once per event-loop iteration in which the count moved, with the count at
    # its end: a batch hands hundreds of records to the producer and Kafka acks them together, and
    # a multiprocess gauge's set (an mmap write after a pid check) per record was ~4% of the
    # ingress's CPU in SendMessageBatch (py-spy, benchmarks/RESULTS.md).
    scheduled = False

    def publish_inflight() -> None:
        nonlocal scheduled
        scheduled = False
        INFLIGHT_WRITES.set(producer.inflight)

    def inflight_moved() -> None:
        nonlocal scheduled
        if not scheduled:
            scheduled = True
            asyncio.get_running_loop().call_soon(publish_inflight)

    async def timed_enqueue(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        delivery = await enqueue(*args, **kwargs)
        inflight_moved()

        def done(fut: Any) -> None:
            bad = fut.cancelled() or fut.exception() is not None
            (failed if bad else ok).observe(time.perf_counter() - started)
            inflight_moved()

        delivery.add_done_callback(done)
        return delivery

    reserve_up_to, release = producer.reserve_up_to, producer.release

    def counted_reserve_up_to(*args: Any, **kwargs: Any) -> Any:
        inflight_moved()
        return reserve_up_to(*args, **kwargs)

    def counted_release(*args: Any, **kwargs: Any) -> Any:
        # Slots are released after the delivery's callbacks ran (the settlement frees them): the
        # gauge must follow, or an idle process shows its last burst as in flight for good.
        inflight_moved()
        return release(*args, **kwargs)

    producer.enqueue = timed_enqueue
    producer.reserve_up_to = counted_reserve_up_to
    producer.release = counted_release


# --- stream processors --------------------------------------------------------------------------


class _ConsumerCollector(Collector):
    """Reads every live `BatchConsumer` of the process when Prometheus scrapes."""

    def __init__(self) -> None:
        self._consumers: weakref.WeakSet[BatchConsumer] = weakref.WeakSet()

    def add(self, consumer: BatchConsumer) -> None:
        self._consumers.add(consumer)

    def collect(self) -> Iterator[Any]:
        lag = GaugeMetricFamily(
            "switchboard_consumer_lag",
            "Records in the log not yet applied (log end minus next offset to apply), per partition",
            labels=["group", "topic", "partition"],
        )
        records = CounterMetricFamily(
            "switchboard_events_processed",
            "Records applied (durable and committed), per processor",
            labels=["processor"],
        )
        dead = CounterMetricFamily(
            "switchboard_dead_lettered", "Records sent to the dead-letter topic", labels=["processor"]
        )
        failures = CounterMetricFamily(
            "switchboard_batch_failures", "Batch attempts that failed (retried)", labels=["processor"]
        )
        restarts = CounterMetricFamily(
            "switchboard_consumer_restarts",
            "Kafka consumers started again: fetching had stopped with records waiting, a commit did not "
            "complete, or a write failed after its batch was processed (the batch is applied again)",
            labels=["processor"],
        )
        joining = GaugeMetricFamily(
            "switchboard_consumer_joining_seconds",
            "How long the consumer has been joining its group without an assignment (0: assigned)",
            labels=["processor"],
        )
        for consumer in list(self._consumers):
            name = consumer._processor.name
            records.add_metric([name], consumer.stats.records)
            dead.add_metric([name], consumer.stats.dead_lettered)
            failures.add_metric([name], consumer.stats.failures)
            restarts.add_metric([name], consumer.stats.restarts)
            since = consumer.stats.joining_since
            joining.add_metric([name], time.monotonic() - since if since is not None else 0.0)
            for partition, (end, fetched) in _log_ends(consumer).items():
                # The next offset to apply: after the last committed batch, else (nothing applied
                # since the assignment) where the consumer fetches from.
                position = consumer.stats.position.get(partition, fetched)
                if position is not None:
                    lag.add_metric(
                        [consumer._group_id, consumer._topic, str(partition)], max(0, end - position)
                    )
        yield from (lag, records, dead, failures, restarts, joining)


def _log_ends(consumer: BatchConsumer) -> dict[int, tuple[int, int | None]]:
    """Per assigned partition: the log end as of the last fetch, and the fetch position (no
    network call; aiokafka keeps both in its assignment state)."""
    kafka = consumer._consumer
    if kafka is None:
        return {}
    ends: dict[int, tuple[int, int | None]] = {}
    with contextlib.suppress(Exception):  # the assignment changing under a scrape: skip this one
        assignment = kafka._subscription.subscription.assignment
        for tp in kafka.assignment():
            if tp.topic != consumer._topic:
                continue
            state = assignment.state_value(tp)
            if state is not None and state.highwater is not None:
                fetched = state.position if state.has_valid_position else None
                ends[tp.partition] = (int(state.highwater), fetched)
    return ends


_collector = _ConsumerCollector()
REGISTRY.register(_collector)


def observe_consumer(consumer: BatchConsumer) -> None:
    """Expose lag, records applied and dead letters of `consumer` (read at scrape time)."""
    _collector.add(consumer)


@contextlib.contextmanager
def batch_observed(processor: str, records: Sequence[Record]) -> Iterator[None]:
    """Around applying and committing one batch: its time and size, and its trace span."""
    started = time.perf_counter()
    with tracing.batch_span(processor, records):
        yield
    BATCH_SECONDS.labels(processor).observe(time.perf_counter() - started)
    BATCH_RECORDS.labels(processor).observe(len(records))


# --- assistant and projector --------------------------------------------------------------------


def _timed(call: Callable[..., Any], histogram: Any) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    return timed


def observe_assistant(classifier: Any, knowledge: Any, gateway: Any) -> None:
    """Time the intent classifier and knowledge retrieval, count gateway attempts by outcome
    (wraps the instances' methods once, at start-up)."""
    classifier.classify = _timed(classifier.classify, MODEL_SECONDS.labels("intent"))
    knowledge.search = _timed(knowledge.search, MODEL_SECONDS.labels("retrieval"))
    stream = gateway.stream

    def observed_stream(request: Any) -> Any:
        return _ObservedReply(stream(request))

    gateway.stream = observed_stream


class _ObservedReply:
    """A gateway `ReplyStream` that counts its attempts once the answer is complete."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[Any]:
        async for delta in self._inner:
            yield delta
        for attempt in self._inner.answer.attempts:
            GATEWAY_CALLS.labels(attempt.adapter, attempt.outcome).inc()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def answer(self) -> Any:
        return self._inner.answer


def observe_clickhouse_inserts(client: Any) -> None:
    """Time every insert of the projector's clickhouse-connect client and count its rows (also
    the span of the insert when tracing is on)."""
    insert = client.insert

    def observed_insert(*args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context")
        qualified = str(kwargs.get("table") or getattr(context, "table", "") or (args[0] if args else ""))
        # An insert context names the table with its database (`switchboard`.`raw_events`).
        table = qualified.rsplit(".", 1)[-1].strip('`"')
        data: Any = getattr(context, "data", None) or kwargs.get("data") or ()
        column_oriented = getattr(context, "column_oriented", False) or kwargs.get("column_oriented", False)
        rows = len(data[0]) if column_oriented and len(data) else len(data)
        started = time.perf_counter()
        with tracing.insert_span(table, rows):
            result = insert(*args, **kwargs)
        PROJECTOR_INSERT_SECONDS.labels(table).observe(time.perf_counter() - started)
        PROJECTOR_ROWS.labels(table).observe(rows)
        return result

    client.insert = observed_insert
