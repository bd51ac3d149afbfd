"""What the knowledge-follower tests share: a topic of their own on the test stack, a producer onto
it and a Redis client (closed afterwards), one tenant's documents upserted and read back, a
follower on that topic with the Kafka consumer class a test gives it, and a quiet stop of the
tasks a test started."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from switchboard.v1 import knowledge_pb2

from schemas import hotview as hv
from services.ingress._knowledge import record_key, upserted
from services.kafka_topics import ensure_topics
from services.settings import Settings
from streams.assistant import _worker
from streams.assistant._worker import KnowledgeFollower
from streams.knowledge import KnowledgeBase


@contextlib.asynccontextmanager
async def knowledge_topic(
    local_stack: Settings,
) -> AsyncIterator[tuple[Settings, AIOKafkaProducer, aioredis.Redis]]:
    """Settings naming a fresh knowledge topic (created), a started producer, a Redis client."""
    settings = local_stack.model_copy(update={"knowledge_topic": f"knowledge-{uuid.uuid4().hex[:8]}"})
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield settings, producer, redis
    finally:
        await producer.stop()
        await redis.aclose()


@dataclass
class Documents:
    """One tenant's documents: upserted onto the knowledge topic, read back from the documents hash."""

    settings: Settings
    producer: AIOKafkaProducer
    redis: aioredis.Redis
    tenant: str

    async def upsert(self, i: int) -> None:
        doc = knowledge_pb2.Document(document_id=f"d-{i}", title=f"Article {i}", body=f"Parcel {i} ships.")
        await self.producer.send_and_wait(
            self.settings.knowledge_topic,
            key=record_key(self.tenant, doc.document_id),
            value=upserted(self.tenant, doc).SerializeToString(),
        )

    async def indexed(self) -> int:
        return int(await self.redis.hlen(hv.documents_key(self.tenant)))

    async def listed(self) -> set[str]:
        keys = await self.redis.hkeys(hv.documents_key(self.tenant))
        return {k.decode() if isinstance(k, bytes) else k for k in keys}


@dataclass
class Following:
    """A knowledge follower, not yet following, and its tenant's documents."""

    follower: KnowledgeFollower
    docs: Documents
    task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.follower.follow())
        return self.task

    async def ready(self) -> None:
        await asyncio.wait_for(self.follower.ready.wait(), 60)


@contextlib.asynccontextmanager
async def knowledge_follower(
    local_stack: Settings,
    monkeypatch: pytest.MonkeyPatch,
    consumer_class: type[AIOKafkaConsumer],
    knowledge: KnowledgeBase,
    tenant_prefix: str,
) -> AsyncIterator[Following]:
    """A follower of a fresh knowledge topic whose Kafka consumers are `consumer_class`, retrying
    quickly; its task (once started) is cancelled afterwards."""
    monkeypatch.setattr(_worker, "AIOKafkaConsumer", consumer_class)
    monkeypatch.setattr(_worker, "KNOWLEDGE_RETRY_INITIAL_S", 0.05)
    tenant = f"{tenant_prefix}{uuid.uuid4().hex[:6]}"
    async with knowledge_topic(local_stack) as (settings, producer, redis):
        following = Following(
            KnowledgeFollower(settings, knowledge, redis), Documents(settings, producer, redis, tenant)
        )
        try:
            yield following
        finally:
            await cancel_quietly(following.task)


async def cancel_quietly(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel the tasks a test started and wait for them, whatever they end with."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
