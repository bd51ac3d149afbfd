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
from switchboard.v1 import events_pb2

from schemas.events import new_event
from services.settings import Settings
from streams._consumer import Record
from streams.sessions._state import Fold
from streams.sessions._worker import SessionsProcessor
from tests.integration.test_erasure_follower_bound import record_of, started

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


def _message(tenant: str, conversation: str, offset: int, text: str) -> Record:
    received = events_pb2.MessageReceived(client_message_id=f"m{offset}", text=text)
    return record_of(new_event(tenant, conversation, message_received=received), offset)


@pytest.mark.timeout(120)
async def test_a_record_the_fold_refuses_is_dead_lettered_when_its_batch_is_applied_again(
    local_stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding (sixth session): the states were written before the refused records were
    dead-lettered. A batch whose dead letter did not reach Kafka (a stop, an outage) is applied
    again, but its conversations' states already stood past the refused record, which the fold
    then skipped as seen: it was never dead-lettered. The fold's own refusal is simulated (no input
    is known to make it raise); every other part is the worker's, on a real Redis."""
    original = Fold.apply

    def refusing(self: Fold, event: Any, position: Any) -> Any:
        seen = self.last_partition == position.partition and position.offset <= self.last_offset
        if event.message_received.text == "refuse me" and not seen:
            # As a refusal of the fold itself would be: for an event it has not applied yet.
            raise ValueError("the fold refuses this event")
        return original(self, event, position)

    monkeypatch.setattr(Fold, "apply", refusing)
    redis = aioredis.Redis.from_url(local_stack.redis_url.rsplit("/", 1)[0] + "/9")
    await redis.flushdb()
    processor = SessionsProcessor(local_stack, redis)
    tenant = f"t{uuid.uuid4().hex[:10]}"
    batch = [
        started(tenant, "c1", 0),
        _message(tenant, "c1", 1, "refuse me"),
        _message(tenant, "c1", 2, "a later message of the same conversation"),
    ]
    dead_lettered: list[int] = []

    async def kafka_down(rejected: Any) -> None:
        raise ConnectionError("Kafka unreachable: the dead letter was not written")

    async def kafka_up(rejected: Any) -> None:
        dead_lettered.extend(r.offset for r, _ in rejected)

    try:
        processor.bind_dead_letter(kafka_down)
        with pytest.raises(ConnectionError):
            await processor.process(batch)
        # The consumer applies the batch again (nothing of it was committed).
        processor = SessionsProcessor(local_stack, redis)
        processor.bind_dead_letter(kafka_up)
        await processor.process(batch)
        assert dead_lettered == [1]
        assert await redis.hget("sb:sessions:applied", "0") == b"3"
    finally:
        await processor.close()
        await redis.flushdb()
        await redis.aclose()
