"""OpenTelemetry spans follow one message: the caller's trace -> the ingress's gRPC span -> the
event's traceparent in Kafka -> the projector's batch and receive spans -> the ClickHouse insert.

In-process, so an in-memory exporter sees every span: the real `IngressServer` (interceptor,
write path, Kafka producer) on its own port against the test stack, and a real `BatchConsumer`
running the real projector over conversation-events into a chdb of its own. The sessions and
assistant workers open the same spans through the same `BatchConsumer` hook; they are not run
in-process here (they are the test system's child processes).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.ingress._server import IngressServer
from services.observability import metrics, tracing
from streams._consumer import BatchConsumer, PartitionControl
from streams.projector import ProjectorProcessor
from tests.conftest import System, eventually
from tests.integration.test_analytics import process_chdb

pytestmark = pytest.mark.integration

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.use_exporter(spans, "switchboard-test", batch=False)
    yield spans
    tracing.disable()


class FromOffsets(ProjectorProcessor):
    """The projector, starting at given offsets (this test's records, not the whole topic)."""

    def __init__(self, client: Any, start: dict[int, int]) -> None:
        super().__init__(client)
        self._start = start

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        for p in partitions:
            consumer.seek(p, self._start.get(p, 0))


async def test_one_message_is_one_trace_from_the_grpc_call_to_clickhouse(
    system: System, tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter
) -> None:
    # Beside the system's ingress, shifted with it by SWITCHBOARD_TEST_PORT_OFFSET.
    port = int(system.settings.grpc_listen.rsplit(":", 1)[1]) + 900
    settings = system.settings.model_copy(update={"grpc_listen": f"127.0.0.1:{port}"})
    ingress = IngressServer(settings)
    await ingress.start()
    _, chdb_client, _ = process_chdb(tmp_path_factory)
    metrics.observe_clickhouse_inserts(chdb_client)
    consumer: BatchConsumer | None = None
    runner: asyncio.Task[None] | None = None
    try:
        await eventually(
            lambda: ingress.hot.is_ready(settings.topic_partitions), bool, what="the hot view ready"
        )
        # Where the topic ends now: the projector below starts there.
        from aiokafka import AIOKafkaConsumer, TopicPartition

        peek = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
        await peek.start()
        try:
            tps = [TopicPartition(settings.conversation_topic, p) for p in range(settings.topic_partitions)]
            start = {tp.partition: int(o) for tp, o in (await peek.end_offsets(tps)).items()}
        finally:
            await peek.stop()

        tenant = f"tr{uuid.uuid4().hex[:10]}"
        caller = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            conv = await stub.StartConversation(
                chat_pb2.StartConversationRequest(tenant_id=tenant, customer_id="c1"), metadata=caller
            )
            ack = await stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=conv.conversation_id, client_message_id="m1", text="hi"
                ),
                metadata=caller,
            )

        processor = FromOffsets(chdb_client, start)
        consumer = BatchConsumer(
            settings,
            processor,
            topic=settings.conversation_topic,
            group_id=f"trace-test-{uuid.uuid4().hex[:8]}",
            batch_size=500,
        )
        await consumer.start()
        runner = asyncio.ensure_future(consumer.run())

        def spans_named(name: str) -> list[Any]:
            return [s for s in exporter.get_finished_spans() if s.name == name]

        async def received() -> int:
            return sum(
                1 for s in spans_named("projector receive") if s.context.trace_id == int(CALLER_TRACE, 16)
            )

        await eventually(received, lambda n: n >= 2, what="the projector's receive spans of both events")
    finally:
        if consumer is not None:
            await consumer.stop()
        if runner is not None:
            await asyncio.wait_for(runner, 30)
        if consumer is not None:
            await consumer.close()
        await ingress.stop(1)

    spans = exporter.get_finished_spans()
    trace_id = int(CALLER_TRACE, 16)
    server = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("/SendMessage")]
    assert len(server) == 1
    (call,) = server
    # The gRPC span continues the caller's trace.
    assert call.context.trace_id == trace_id and call.parent is not None
    assert call.parent.span_id == int(CALLER_SPAN, 16)
    # The event in Kafka carries the gRPC span as its traceparent: the projector's receive span of
    # the message is that span's child, in the same trace.
    receives = [
        s
        for s in spans
        if s.name == "projector receive" and s.parent is not None and s.parent.span_id == call.context.span_id
    ]
    assert len(receives) == 1 and dict(receives[0].attributes or {})["messaging.kafka.offset"] == ack.offset
    # ... and links to the batch span that applied it, which links back to the message.
    (link,) = receives[0].links
    batches = [
        s for s in spans if s.name == "projector process" and s.context.span_id == link.context.span_id
    ]
    assert len(batches) == 1
    batch = batches[0]
    assert any(
        link.context.span_id == call.context.span_id and link.context.trace_id == trace_id
        for link in batch.links
    )
    # The ClickHouse inserts of that batch are its children.
    inserts = [
        s
        for s in spans
        if s.name == "clickhouse insert"
        and s.parent is not None
        and s.parent.span_id == batch.context.span_id
    ]
    assert {dict(s.attributes or {})["db.collection.name"] for s in inserts} >= {"raw_events", "raw_messages"}
