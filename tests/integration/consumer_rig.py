"""What the BatchConsumer tests share: a conversation topic of their own on the test stack, a
started producer, a processor that collects what it is given, and a consumer running on that
topic in a task, stopped and closed afterwards however the test ended."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from aiokafka import AIOKafkaProducer

from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams._consumer import BatchConsumer, PartitionControl, Processor, Record, Rejected


class Collect:
    name = "stall-test"

    def __init__(self) -> None:
        self.values: list[bytes] = []

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        # Where Kafka's committed offsets say (the consumer's default): nothing to seek.
        return None

    async def on_revoked(self, partitions: set[int]) -> None:
        return None

    async def idle(self, consumer: PartitionControl) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        self.values.extend(r.value or b"" for r in records)
        return []


class Collecting(Processor, Protocol):
    """A processor that keeps the values it applied, in order."""

    values: list[bytes]


P = TypeVar("P", bound=Processor)
C = TypeVar("C", bound=Collecting)


@dataclass
class Running(Generic[P]):
    """A started consumer, the task running it and its processor."""

    consumer: BatchConsumer
    task: asyncio.Future[None]
    processor: P

    def alive(self) -> None:
        # A probe fails at once when the consumer ended, rather than waiting out its bound.
        assert not self.task.done(), self.task

    async def applied(self: Running[C]) -> list[bytes]:
        self.alive()
        return list(self.processor.values)


async def fresh_topic(local_stack: Settings, prefix: str) -> Settings:
    """Settings naming a fresh conversation topic (created)."""
    settings = local_stack.model_copy(update={"conversation_topic": f"{prefix}-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    return settings


@contextlib.asynccontextmanager
async def started_producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def send_all(producer: AIOKafkaProducer, topic: str, values: Iterable[bytes]) -> None:
    """Produce the values one by one, all on one key (one partition, so in order)."""
    for value in values:
        await producer.send_and_wait(topic, value, key=b"k")


@contextlib.asynccontextmanager
async def running_consumer(
    settings: Settings,
    processor: P,
    prefix: str,
    batch_size: int = 64,
    static: bool = True,
    stop_within_s: float = 10,
) -> AsyncIterator[Running[P]]:
    """A BatchConsumer of its own group on the settings' conversation topic, started and running;
    a static member of the group (an instance id of its own) unless `static` is false."""
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id=f"{prefix}-{uuid.uuid4().hex[:8]}",
        instance_id=f"{prefix}-{uuid.uuid4().hex[:8]}" if static else None,
        batch_size=batch_size,
    )
    await consumer.start()
    task = asyncio.ensure_future(consumer.run())
    try:
        yield Running(consumer, task, processor)
    finally:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, stop_within_s)
        await consumer.close()
