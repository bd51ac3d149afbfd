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
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber
from switchboard.v1 import events_pb2

from schemas.events import encode_event, event_headers, new_event
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", ["sequence broken", "never answers"])
async def test_customer_messages_are_answered_not_dead_lettered_after_the_producer_broke(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # "never answers": seen after a broker restart (a dead-letter producer there), sends that
    # neither complete nor fail; the batch must not wait for them without bound.
    monkeypatch.setattr(_worker, "DECISIONS_ACK_BOUND_S", 2.0)
    suffix = uuid.uuid4().hex[:8]
    settings = local_stack.model_copy(
        update={
            "conversation_topic": f"assistant-broken-{suffix}",
            "dead_letter_topic": f"dead-letter-{suffix}",
            "models_dir": MODELS_DIR,
        }
    )
    await ensure_topics(settings)
    tenant = f"ab{suffix}"
    knowledge, classifier = await asyncio.to_thread(load_models, settings)
    knowledge.upsert(
        tenant,
        [Document(document_id="shipping", title="Shipping times", body="Parcels ship within two days.")],
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()

    async def broken_send(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        delivery: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if fault == "sequence broken":
            delivery.set_exception(OutOfOrderSequenceNumber())
        return delivery

    producer.send = broken_send
    gateway = ModelGateway(GatewayConfig.from_env_string(settings.gateway))
    processor = AssistantProcessor(settings, redis, producer, knowledge, classifier, gateway)
    consumer = BatchConsumer(
        settings, processor, topic=settings.conversation_topic, group_id=f"ab-{suffix}", batch_size=16
    )
    writer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await writer.start()
    await consumer.start()
    running = asyncio.ensure_future(consumer.run())
    try:
        for i in range(3):
            # Each conversation from its start, as in the log (the assistant reads the mode of a
            # conversation it joins midway from the sessions worker's hot view).
            for event in (
                new_event(tenant, f"c{i}", conversation_started=events_pb2.ConversationStarted()),
                new_event(
                    tenant,
                    f"c{i}",
                    message_received=events_pb2.MessageReceived(text="How long does shipping take?"),
                ),
            ):
                await writer.send_and_wait(
                    settings.conversation_topic,
                    key=event.conversation_id.encode(),
                    value=encode_event(event),
                    headers=event_headers(event),
                )

        async def outcome() -> tuple[int, int]:
            assert not running.done(), running
            return processor.decided, consumer.stats.dead_lettered

        decided, dead = await eventually(
            outcome, lambda o: o[0] == 3 or o[1] > 0, within_s=60, what="the messages answered"
        )
        assert (decided, dead) == (3, 0), f"{dead} customer messages dead-lettered, {decided} answered"
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
