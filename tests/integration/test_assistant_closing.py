"""The assistant says nothing in a conversation being closed: `AssistantProcessor._closing` reads the
hold an ingress's close takes before it publishes the close, and the close recorded once durable,
from a real Redis, written by the ingress's own code (`IngressHotView`). Before, a message closed
right after its ack was answered after the close in 6 of 10 conversations (a walkthrough saw 8 of 8
and hand-offs of closed conversations); `test_assistant.py` covers the close seen in the batch."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from schemas import hotview as hv
from schemas.events import Event
from services.ingress._hotview import IngressHotView
from services.settings import Settings
from streams.assistant._worker import AssistantProcessor

pytestmark = pytest.mark.integration


async def test_a_conversation_held_for_its_close_is_answered_only_if_the_close_does_not_happen(
    local_stack: Settings,
) -> None:
    r = aioredis.Redis.from_url(local_stack.redis_url)
    hot = IngressHotView(r, local_stack.idempotency_ttl_s)
    processor = AssistantProcessor(local_stack, r, None, None, None, None)  # type: ignore[arg-type]
    tenant = "closing"
    try:
        open_one = Event(event_id="m0", tenant_id=tenant, conversation_id=uuid.uuid4().hex)
        assert not await processor._closing(open_one)  # open: answered

        # Held, then closed while the bot waits: nothing said, and remembered.
        closed = Event(event_id="m1", tenant_id=tenant, conversation_id=uuid.uuid4().hex)
        await hot.hold_for_close(tenant, closed.conversation_id, b"pending:close-1")
        waiting = asyncio.ensure_future(processor._closing(closed))
        await asyncio.sleep(0.1)  # the bot is waiting on the hold (nothing to await: it polls Redis)
        assert not waiting.done()
        await hot.mark_closed(tenant, closed.conversation_id, 1)
        assert await asyncio.wait_for(waiting, 5)
        assert processor._closed(closed)

        # Held, then released (Kafka refused the close): answered, and not remembered as closed
        # (a review: a hold remembered as a close left the bot silent in that conversation for good).
        released = Event(event_id="m2", tenant_id=tenant, conversation_id=uuid.uuid4().hex)
        await hot.hold_for_close(tenant, released.conversation_id, b"pending:close-2")
        waiting = asyncio.ensure_future(processor._closing(released))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await hot.release_close(tenant, released.conversation_id, b"pending:close-2")
        assert not await asyncio.wait_for(waiting, 5)
        assert not processor._closed(released)

        # A hold whose time ran out (its process died before releasing it) holds nothing.
        stale = Event(event_id="m3", tenant_id=tenant, conversation_id=uuid.uuid4().hex)
        await r.hset(hv.conversation_key(tenant, stale.conversation_id), hv.F_CLOSING, "1000:pending:gone")
        assert not await processor._closing(stale)
    finally:
        processor._models.shutdown(wait=True)
        await r.aclose()
