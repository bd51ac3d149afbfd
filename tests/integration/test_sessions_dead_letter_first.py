"""The sessions worker dead-letters a batch's poison before its own position passes it.

Seen in a 30-cycle soak: the sessions worker keeps its position per partition in Redis, written
at the end of `process`, and the BatchConsumer dead-lettered the refused records after `process`
returned. Killed in between (the soak's kill -9 of the worker), the restarted worker resumed from
Redis past the poison record, which was never dead-lettered by it (the projector and the
assistant, whose position is Kafka's committed offset, had it). Here the order is checked: the
dead letter is durable before the position that passes it is written.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.settings import Settings
from streams._consumer import Record
from streams.sessions._worker import SessionsProcessor
from tests.integration.test_erasure_follower_bound import started

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_poison_is_dead_lettered_before_the_position_passes_it(local_stack: Settings) -> None:
    redis = aioredis.Redis.from_url(local_stack.redis_url.rsplit("/", 1)[0] + "/9")
    await redis.flushdb()
    processor = SessionsProcessor(local_stack, redis)
    steps: list[str] = []

    async def dead_letter(rejected: Any) -> None:
        steps.extend(f"dead-letter {r.offset}" for r, _ in rejected)

    processor.bind_dead_letter(dead_letter)
    set_positions = processor._set_positions

    async def positions(*args: Any, **kwargs: Any) -> Any:
        steps.append("positions")
        return await set_positions(*args, **kwargs)

    processor._set_positions = positions  # type: ignore[assignment]
    tenant = f"t{uuid.uuid4().hex[:10]}"
    poison = Record("conversation-events", 0, 1, b"x", b"\x0a\xff poison", 0, ())
    try:
        rejected = await processor.process([started(tenant, "c1", 0), poison, started(tenant, "c2", 2)])
        assert steps == ["dead-letter 1", "positions"]
        assert list(rejected) == []  # dead-lettered already: not a second time by the consumer
        assert await redis.hget("sb:sessions:applied", "0") == b"3"
    finally:
        await processor.close()
        await redis.flushdb()
        await redis.aclose()
