"""The assistant replaces its Kafka producer when the broker broke its sequence state.

An idempotent producer whose sequence state a broker restart broke (OutOfOrderSequenceNumber,
UnknownProducerId: README, "Kafka stopped or kill -9-ed") fails every later send for good; only a
new producer, with a new producer id, writes again. The ingress replaces its producer then; the
assistant kept its own, and the error is no outage to the consumer, so every customer message of
the batch failed the same way, was taken for poison and dead-lettered, never answered, until the
assistant was restarted. Real Kafka and Redis; the broken state is the producer's own error
raised from its send, for every send of that producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber
from switchboard.v1 import events_pb2

from schemas.events import Event, decode_event, encode_event, event_headers, event_type, new_event
from services.kafka_clients import started
from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams._consumer import BatchConsumer
from streams.assistant import _worker
from streams.assistant._worker import AssistantProcessor, load_models
from streams.assistant.gateway import GatewayConfig, ModelGateway
from streams.knowledge import Document
from tests.conftest import eventually

pytestmark = pytest.mark.integration

MODELS_DIR = Path(__file__).resolve().parents[2] / "var" / "models"


@dataclass
class _Rig:
    settings: Settings
    tenant: str
    processor: AssistantProcessor
    consumer: BatchConsumer
    running: asyncio.Future[None]
    writer: AIOKafkaProducer

    async def write(self, *events: Event) -> None:
        for event in events:
            await self.writer.send_and_wait(
                self.settings.conversation_topic,
                key=event.conversation_id.encode(),
                value=encode_event(event),
                headers=event_headers(event),
            )


@contextlib.asynccontextmanager
async def _assistant(local_stack: Settings, name: str, breaks: Callable[[Any], None]) -> AsyncIterator[_Rig]:
    """An assistant on a topic of its own (a tenant with a one-article FAQ), its producer broken
    by `breaks` before anything is sent, consuming until the block ends."""
    suffix = uuid.uuid4().hex[:8]
    settings = local_stack.model_copy(
        update={
            "conversation_topic": f"{name}-{suffix}",
            "dead_letter_topic": f"dead-letter-{suffix}",
            "models_dir": MODELS_DIR,
        }
    )
    await ensure_topics(settings)
    tenant = f"t{suffix}"
    knowledge, classifier = await asyncio.to_thread(load_models, settings)
    knowledge.upsert(
        tenant,
        [Document(document_id="shipping", title="Shipping times", body="Parcels ship within two days.")],
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    producer = await started(
        AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    )
    breaks(producer)
    gateway = ModelGateway(GatewayConfig.from_env_string(settings.gateway))
    processor = AssistantProcessor(settings, redis, producer, knowledge, classifier, gateway)
    consumer = BatchConsumer(
        settings, processor, topic=settings.conversation_topic, group_id=f"{name}-{suffix}", batch_size=16
    )
    writer = await started(AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all"))
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())
    try:
        yield _Rig(settings, tenant, processor, consumer, running, writer)
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        await consumer.close()
        await writer.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await processor.stop_producer()
        await gateway.aclose()
        await redis.aclose()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["sequence broken", "never answers"])
async def test_customer_messages_are_answered_not_dead_lettered_after_the_producer_broke(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # "never answers": seen after a broker restart (a dead-letter producer there), sends that
    # neither complete nor fail; the batch must not wait for them without bound.
    monkeypatch.setattr(_worker, "DECISIONS_ACK_BOUND_S", 2.0)

    def broken(producer: Any) -> None:
        async def broken_send(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
            delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            if fault == "sequence broken":
                delivery.set_exception(OutOfOrderSequenceNumber())
            return delivery

        producer.send = broken_send

    async with _assistant(local_stack, "assistant-broken", broken) as rig:
        for i in range(3):
            # Each conversation from its start, as in the log (the assistant reads the mode of a
            # conversation it joins midway from the sessions worker's hot view).
            await rig.write(
                new_event(rig.tenant, f"c{i}", conversation_started=events_pb2.ConversationStarted()),
                new_event(
                    rig.tenant,
                    f"c{i}",
                    message_received=events_pb2.MessageReceived(text="How long does shipping take?"),
                ),
            )

        async def outcome() -> tuple[int, int]:
            assert not rig.running.done(), rig.running
            return rig.processor.decided, rig.consumer.stats.dead_lettered

        decided, dead = await eventually(
            outcome, lambda o: o[0] == 3 or o[1] > 0, within_s=60, what="the messages answered"
        )
        assert (decided, dead) == (3, 0), f"{dead} customer messages dead-lettered, {decided} answered"


async def _log_kinds(settings: Settings) -> list[str]:
    """Every event type in the conversation topic, in log order (a short, fresh topic)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.conversation_topic, p) for p in range(settings.topic_partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        kinds: list[str] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                kinds.extend(event_type(decode_event(r.value)) for r in records)
        return kinds
    finally:
        await consumer.stop()


@pytest.mark.timeout(300)
async def test_a_handoff_decided_in_a_batch_whose_send_failed_is_decided_again_on_its_retry(
    local_stack: Settings,
) -> None:
    """Found by a review: `_decide` marks the conversation handed off in memory before Kafka has
    the decision. When the decisions' send failed (here the producer's sender task ended before
    writing, as an error aiokafka does not expect ends it), the producer was replaced and the
    batch retried, but the retry found the conversation 'agent' already and skipped the message:
    the batch was committed with no handoff in the log, and the customer was answered by nobody."""

    def sender_ends_unsent(producer: Any) -> None:
        async def fails_unsent(node_id: int, batches: Any) -> None:
            raise RuntimeError("an unexpected error in the sender routine (made by the test)")

        producer._sender._send_produce_req = fails_unsent

    async with _assistant(local_stack, "assistant-retry", sender_ends_unsent) as rig:
        await rig.write(
            new_event(rig.tenant, "c1", conversation_started=events_pb2.ConversationStarted()),
            new_event(
                rig.tenant,
                "c1",
                message_received=events_pb2.MessageReceived(text="I want to talk to a human"),
            ),
        )

        async def kinds() -> list[str]:
            assert not rig.running.done(), rig.running
            return await _log_kinds(rig.settings)

        logged = await eventually(
            kinds, lambda k: "handoff_requested" in k, within_s=60, what="the customer's handoff in the log"
        )
        assert logged.count("handoff_requested") == 1, logged
        assert rig.consumer.stats.dead_lettered == 0
