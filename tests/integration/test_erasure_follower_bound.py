"""A sessions batch waits for the erasure registry only so long (streams/privacy/erasures.py).

The worker read the privacy topic inside its first batch, and aiokafka waits as long as Kafka does
not answer: the partitions' folds stood still meanwhile. Kafka not answering is a broker stopped
with SIGSTOP (connections still accepted, nothing answered), as in test_ingress_guarantees.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import psutil
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event, encode_event, event_headers, event_key, new_event
from services import stack
from services.settings import Settings
from streams._consumer import Record, is_outage
from streams.privacy._erase import erasure_event
from streams.privacy.erasures import ErasureFollower, publish_erasure
from streams.sessions._worker import SessionsProcessor
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

# The bound this test gives the follower, and how long the old code was given to return.
BOUND_S = 2.0
GIVEN_S = 20.0


def record_of(event: Event, offset: int) -> Record:
    """`event` as the consumer hands it over from partition 0 of conversation-events."""
    return Record(
        "conversation-events",
        0,
        offset,
        event_key(event),
        encode_event(event),
        0,
        tuple(event_headers(event)),
    )


def started(tenant: str, conversation: str, offset: int) -> Record:
    return record_of(
        new_event(tenant, conversation, conversation_started=events_pb2.ConversationStarted()), offset
    )


@pytest.mark.timeout(180)
async def test_a_batch_does_not_wait_without_bound_for_an_unanswering_privacy_topic(
    local_stack: Settings,
) -> None:
    tenant = f"t{uuid.uuid4().hex[:10]}"
    # Erased before the worker starts: the registry must be read before this batch is folded.
    await publish_erasure(local_stack, erasure_event(tenant, "cust", ["gone"], "test", time.time_ns()))
    # A logical database of its own: the session's processes use db 0.
    redis = aioredis.Redis.from_url(local_stack.redis_url.rsplit("/", 1)[0] + "/8")
    await redis.flushdb()
    follower = ErasureFollower(local_stack, start_timeout_s=BOUND_S)
    processor = SessionsProcessor(local_stack, redis, follower)
    batch = [started(tenant, "gone", 0), started(tenant, "kept", 1)]
    broker = psutil.Process((await stack.status(local_stack))["kafka"]["pid"])
    broker.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        attempt = asyncio.ensure_future(processor.process(batch))
        await asyncio.wait({attempt}, timeout=GIVEN_S)
        waited = time.monotonic() - began
        assert attempt.done(), f"the batch still waits for the erasure registry after {waited:.0f}s"
        exc = attempt.exception()
        # An outage for the BatchConsumer: retried, neither committed nor dead-lettered.
        assert isinstance(exc, TimeoutError) and is_outage(exc), repr(exc)
        assert local_stack.privacy_topic in str(exc)
        # Nothing of the batch was folded without the registry.
        assert await redis.exists(hv.conversation_key(tenant, "kept")) == 0
        assert await redis.hget(hv.APPLIED_KEY, "0") is None
    finally:
        broker.send_signal(signal.SIGCONT)
    try:
        # Kafka answers again: the retried batch goes through, without the erased conversation
        # (the read went on in the background meanwhile).
        async def retry() -> bool:
            try:
                await processor.process(batch)
            except TimeoutError:
                return False
            return True

        await eventually(retry, bool, within_s=90, what="the batch folded once Kafka answers")
        assert await redis.exists(hv.conversation_key(tenant, "kept")) == 1
        assert await redis.exists(hv.conversation_key(tenant, "gone")) == 0
        assert await redis.hget(hv.APPLIED_KEY, "0") == b"2"
    finally:
        await processor.close()
        await redis.flushdb()
        await redis.aclose()
