"""A touch of claims that reaches Redis after their settlement changes nothing.

The ingress touches the claims of a batch that Kafka has not acknowledged for a third of their
TTL (IngressHotView.touch_claims), on one connection, while the settlement may go out on another
once the acks arrive. Seen in the seventeenth session's review: a touch that timed out on its
side can still run in Redis after the settlement. It then cut the recorded ack's expiry from the
idempotency window (7 days) to 120 s, put the settled message back in its conversation's in-flight
set (a close of the conversation then waited up to 120 s for it), and held a settled close's
conversation as "being closed" again. A touch now leaves a claim that holds an ack alone. A claim
taken over by another attempt only has this attempt's in-flight entry extended; a claim Redis no
longer has (lost with its data, or dropped by a failed write's settlement: not told apart) has its
entry and close hold put back, as before.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from schemas import hotview as hv
from services.ingress._hotview import CLAIM_TTL_S, HeldClaim, IngressHotView, NothingSent, TickPipeline
from services.ingress._producer import Ack
from tests.integration.test_tick_pipeline import client, redis_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

TTL_S = 7 * 24 * 3600


@pytest.fixture
async def hot(client: aioredis.Redis) -> AsyncIterator[IngressHotView]:  # noqa: F811
    """The view under test; its tick pipeline's own connections closed afterwards."""
    view = IngressHotView(client, TTL_S)
    try:
        yield view
    finally:
        await view.close()


async def _held(redis: aioredis.Redis, client_message_id: str, claim_ttl_s: int = 5) -> HeldClaim:
    """A claim as claim_many leaves it: the key holds the attempt's marker, and the message is a
    member of its conversation's in-flight set (scored by until when, Redis ms)."""
    marker = b"pending:0123456789ab:" + client_message_id.encode()
    held = HeldClaim("t", "c1", client_message_id, marker, in_flight=True)
    await redis.set(held.redis_key, marker, ex=claim_ttl_s)
    until = int(time.time() * 1000) + claim_ttl_s * 1000
    await redis.zadd(held.in_flight_key, {held.in_flight_member: until})
    return held


async def _held_close(
    redis: aioredis.Redis, conversation_id: str, marker: bytes, holder: bytes | None = None
) -> HeldClaim:
    """A close's claim, held by `holder` (this attempt's marker unless another took it over)."""
    held = HeldClaim("t", conversation_id, hv.CLOSE_CLAIM, marker)
    await redis.set(held.redis_key, holder or marker, ex=30 if holder else 5)
    return held


async def test_a_touch_after_the_settlement_leaves_the_ack_and_the_in_flight_set_alone(
    client: aioredis.Redis,  # noqa: F811
    hot: IngressHotView,
) -> None:
    held = await _held(client, "m1")
    ack = Ack("0192f0e0-0000-7000-8000-000000000001", 2, 41)
    await hot.settle_many([(held, ack)])
    recorded = hv.encode_claim(ack.event_id, ack.partition, ack.offset).encode()
    assert await client.get(held.redis_key) == recorded
    assert await client.zscore(held.in_flight_key, held.in_flight_member) is None
    # The touch sent before the acks arrived, run by Redis only now.
    await hot.touch_claims([held])
    assert await client.get(held.redis_key) == recorded
    assert await client.ttl(held.redis_key) > TTL_S - 60, "the ack's idempotency window was cut"
    assert await client.zscore(held.in_flight_key, held.in_flight_member) is None, (
        "a settled message is back in its conversation's in-flight set"
    )


async def test_a_touch_of_a_settled_close_does_not_hold_its_conversation_again(
    client: aioredis.Redis,  # noqa: F811
    hot: IngressHotView,
) -> None:
    marker = b"pending:0123456789ab:close"
    held = await _held_close(client, "c2", marker)
    conversation = hv.conversation_key("t", "c2")
    await client.hset(conversation, hv.F_CLOSING, f"{int(time.time() * 1000) + 5000}:{marker.decode()}")
    ack = Ack("0192f0e0-0000-7000-8000-000000000002", 1, 7)
    await hot.settle_many([(held, ack)])
    await client.hdel(conversation, hv.F_CLOSING)  # the close's next step released its hold
    await hot.touch_claims([held])
    assert await client.hget(conversation, hv.F_CLOSING) is None, "the conversation is held again"
    assert await client.ttl(held.redis_key) > TTL_S - 60


async def test_a_touch_of_a_pending_claim_extends_it_and_its_in_flight_entry(
    client: aioredis.Redis,  # noqa: F811
    hot: IngressHotView,
) -> None:
    held = await _held(client, "m3", claim_ttl_s=5)
    close_marker = b"pending:0123456789ab:close3"
    close = await _held_close(client, "c3", close_marker)
    conversation = hv.conversation_key("t", "c3")
    before = time.time() * 1000
    await hot.touch_claims([held, close])
    assert await client.get(held.redis_key) == held.marker
    assert await client.ttl(held.redis_key) > CLAIM_TTL_S - 10
    score = await client.zscore(held.in_flight_key, held.in_flight_member)
    assert score is not None and score >= before + (CLAIM_TTL_S - 10) * 1000
    assert await client.ttl(close.redis_key) > CLAIM_TTL_S - 10
    holding = bytes(await client.hget(conversation, hv.F_CLOSING) or b"")  # type: ignore[arg-type]
    assert holding.endswith(b":" + close_marker)
    assert int(holding.split(b":", 1)[0]) >= before + (CLAIM_TTL_S - 10) * 1000


async def test_a_touch_of_a_claim_redis_lost_puts_its_in_flight_entry_back(
    client: aioredis.Redis,  # noqa: F811
    hot: IngressHotView,
) -> None:
    # Redis lost the claim and the in-flight set with its data (a kill -9 before its AOF was
    # written) while the write waits for Kafka: closes of the conversation must wait for it again.
    held = await _held(client, "m4")
    await client.delete(held.redis_key, held.in_flight_key)
    await hot.touch_claims([held])
    assert await client.zscore(held.in_flight_key, held.in_flight_member) is not None
    assert await client.get(held.redis_key) is None  # not made up: the settlement records it


async def test_a_touch_of_a_claim_another_attempt_took_over_extends_only_its_own_in_flight_entry(
    client: aioredis.Redis,  # noqa: F811
    hot: IngressHotView,
) -> None:
    # This process seemed dead and a retry took the claim over; this attempt's record may still
    # land, so closes must keep waiting for it, but the claim and the hold are the other's.
    held = await _held(client, "m5", claim_ttl_s=5)
    theirs = b"pending:ba9876543210:m5"
    await client.set(held.redis_key, theirs, ex=30)
    close = await _held_close(
        client, "c5", b"pending:0123456789ab:close5", holder=b"pending:ba9876543210:close5"
    )
    before = time.time() * 1000
    await hot.touch_claims([held, close])
    assert await client.get(held.redis_key) == theirs
    assert await client.ttl(held.redis_key) <= 30
    score = await client.zscore(held.in_flight_key, held.in_flight_member)
    assert score is not None and score >= before + (CLAIM_TTL_S - 10) * 1000
    assert await client.hget(hv.conversation_key("t", "c5"), hv.F_CLOSING) is None


async def test_a_claim_refused_before_it_was_sent_starts_no_release(
    hot: IngressHotView,
    client: aioredis.Redis,  # noqa: F811
) -> None:
    """Past the tick pipeline's connection budget a claim is refused before it is written: an
    outage to the caller, but nothing of it can run later, so no release of it is started (each
    would retry for up to CLAIM_TTL_S, more round trips against the budget that refused it)."""
    hot._tick.MAX_OPEN = 0
    with pytest.raises(NothingSent, match="Too many connections"):
        await hot.claim_many([("t", "c1", "m1"), ("t", "c1", "m2")], 0, unless_closed=True)
    assert not hot._releasing
    assert await client.exists(hv.idempotency_key("t", "c1", "m1")) == 0
    # Within the budget again, the same ids are claimed at once: nothing was left pending.
    hot._tick.MAX_OPEN = TickPipeline.MAX_OPEN
    claims = await hot.claim_many([("t", "c1", "m1"), ("t", "c1", "m2")], 0, unless_closed=True)
    assert [c.claimed for c in claims] == [True, True]
