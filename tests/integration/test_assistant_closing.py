"""The assistant says nothing in a conversation being closed: `AssistantProcessor._closing` reads the
hold an ingress's close takes before it publishes the close, and the close recorded once durable,
from a real Redis, written by the ingress's own code (`IngressHotView`). Before, a message closed
right after its ack was answered after the close in 6 of 10 conversations (a walkthrough saw 8 of 8
and hand-offs of closed conversations); `test_assistant.py` covers the close seen in the batch."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from schemas import hotview as hv
from schemas.events import Event
from services.ingress._hotview import IngressHotView
from services.settings import Settings
from streams.assistant._worker import AssistantProcessor

pytestmark = pytest.mark.integration


async def test_a_conversation_held_for_its_close_or_closed_is_not_answered(local_stack: Settings) -> None:
    r = aioredis.Redis.from_url(local_stack.redis_url)
    hot = IngressHotView(r, local_stack.idempotency_ttl_s)
    processor = AssistantProcessor(local_stack, r, None, None, None, None)  # type: ignore[arg-type]
    tenant, conversation = "closing", uuid.uuid4().hex
    message = Event(event_id="m1", tenant_id=tenant, conversation_id=conversation)
    try:
        assert not await processor._closing(message)  # open: answered
        await hot.hold_for_close(tenant, conversation, b"pending:close-attempt")
        assert await processor._closing(message)  # the close is under way
        assert processor._closed(message)  # ...and remembered
        processor._conversations.clear()
        await hot.release_close(tenant, conversation, b"pending:close-attempt")
        assert not await processor._closing(message)  # the close gave up: answered again
        # A hold whose time ran out (its process died before releasing it) holds nothing.
        await r.hset(hv.conversation_key(tenant, conversation), hv.F_CLOSING, "1000:pending:gone")
        assert not await processor._closing(message)
        await hot.mark_closed(tenant, conversation, 1)
        assert await processor._closing(message)
    finally:
        processor._models.shutdown(wait=True)
        await r.aclose()
