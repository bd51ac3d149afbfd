"""What the knowledge-follower tests share: a topic of their own on the test stack, a producer onto
it and a Redis client (closed afterwards), and a quiet stop of the tasks a test started."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from services.kafka_topics import ensure_topics
from services.settings import Settings


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


async def cancel_quietly(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel the tasks a test started and wait for them, whatever they end with."""
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
