"""Review of the ingress leases (session 8): cases where a claim's takeover or the pending-claim
recheck breaks "once per client_message_id".

Each test here reproduced a finding (failing before its fix).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Sequence
from dataclasses import astuple
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import new_event
from services.ingress._hotview import Claim, HeldClaim, IngressHotView, end_lease, new_lease_id
from services.ingress._producer import Ack, EventProducer
from services.ingress._validation import RequestRejected
from services.ingress._writes import ConversationWrites, WriteOrder
from tests.integration.conftest import System, eventually
from tests.integration.test_ingress_guarantees import message, start
from tests.integration.test_ingress_review import stub_read

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
async def test_review_s8_a_resend_of_an_acked_message_of_a_dead_process_is_not_written_again(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """Process A acks m1 (Kafka has it) and dies before its settle reaches Redis (settles go in
    the background after the caller is answered). Its supervisor ends its lease at once. The
    client re-sends m1 (it lost the response, or re-sends on purpose) to process B before the
    sessions worker recorded the claim from the log: B must answer A's ack (duplicate=true) or
    UNAVAILABLE, never write m1 a second time with a new event id."""
    s = system.settings
    conversation = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producers = [EventProducer(s), EventProducer(s)]
    for p in producers:
        await p.start()
    lease_a = new_lease_id()
    hot_a = IngressHotView(redis, s.idempotency_ttl_s, lease_id=lease_a)
    hot_b = IngressHotView(redis, s.idempotency_ttl_s)
    await hot_a.renew_lease()
    await hot_b.renew_lease()
    leasing = asyncio.ensure_future(hot_b.keep_lease())  # as IngressServer does
    a, b = (ConversationWrites(s, p, h, stub_read) for p, h in zip(producers, (hot_a, hot_b), strict=True))
    never = asyncio.Event()  # A dies before its record of the ack reaches Redis
    settle_a = hot_a.settle_many

    async def dead_settle(outcomes: Sequence[tuple[HeldClaim, Ack | None]], **kw: Any) -> None:
        await never.wait()

    hot_a.settle_many = dead_settle  # type: ignore[method-assign]
    # The sessions worker records claims from the log (the backstop): lagging, as under load.
    sessions = system.children["sessions"].proc
    assert sessions is not None
    os.killpg(sessions.pid, signal.SIGSTOP)
    try:
        (acked,) = await a.accept_messages([message(tenant, conversation, "m1")], "", WriteOrder(None))
        assert isinstance(acked, chat_pb2.SendMessageResponse), acked
        await end_lease(redis, lease_a)  # what `switchboard ingress` does once A exited
        (answer,) = await b.accept_messages([message(tenant, conversation, "m1")], "", WriteOrder(None))
        if isinstance(answer, chat_pb2.SendMessageResponse):
            assert answer.duplicate and answer.event_id == acked.event_id, (
                f"m1 acked twice: {acked.event_id} and again as a new write {answer.event_id} "
                f"(duplicate={answer.duplicate})"
            )
    finally:
        os.killpg(sessions.pid, signal.SIGCONT)
        hot_a.settle_many = settle_a  # type: ignore[method-assign]
        leasing.cancel()
        never.set()
        await a.drain(10)
        await b.drain(10)
        for p in producers:
            await p.stop()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_review_s8_a_failed_recheck_does_not_leave_the_batchs_other_claims_pending(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """A batch [m1, m2] where m2 is pending in another (live) process: m1 is claimed by the first
    claim call, m2 is looked at again. The recheck fails (here: a partition marked not ready in
    between, as the sessions worker does when it sees Redis at an earlier point; a Redis error
    does the same). The batch is refused UNAVAILABLE, so the client retries m1: m1's claim must
    not be left pending (it refuses every retry "being written by an earlier attempt" for 120 s:
    this process is alive, so its lease keeps the claim from being taken over)."""
    s = system.settings
    conversation = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    hot_a = IngressHotView(redis, s.idempotency_ttl_s)
    other = IngressHotView(redis, s.idempotency_ttl_s)  # a live process writing m2 (Kafka slow)
    await hot_a.renew_lease()
    await other.renew_lease()
    leasing = [asyncio.ensure_future(h.keep_lease()) for h in (hot_a, other)]  # as IngressServer does
    a = ConversationWrites(s, producer, hot_a, stub_read)
    m1, m2 = f"m1-{uuid.uuid4().hex[:6]}", f"m2-{uuid.uuid4().hex[:6]}"
    (held,) = await other.claim_many([(tenant, conversation, m2)], s.topic_partitions, unless_closed=True)
    assert held.claimed
    calls = 0
    claim_a = hot_a.claim_many

    async def not_ready_on_recheck(*args: Any, **kwargs: Any) -> list[Claim]:
        nonlocal calls
        calls += 1
        if calls != 2:
            return await claim_a(*args, **kwargs)
        value = await redis.hget(hv.READY_KEY, "0")
        await redis.hdel(hv.READY_KEY, "0")
        try:
            return await claim_a(*args, **kwargs)
        finally:
            await redis.hset(hv.READY_KEY, "0", value or b"1")

    hot_a.claim_many = not_ready_on_recheck  # type: ignore[method-assign]
    try:
        first = await a.accept_messages(
            [message(tenant, conversation, m1), message(tenant, conversation, m2)], "", WriteOrder(None)
        )
        assert calls >= 2, calls
        assert not isinstance(first[0], chat_pb2.SendMessageResponse), first  # refused: retry
        hot_a.claim_many = claim_a  # type: ignore[method-assign]
        key = hv.idempotency_key(tenant, conversation, m1)

        async def retry() -> chat_pb2.SendMessageResponse | Any:
            (answer,) = await a.accept_messages([message(tenant, conversation, m1)], "", WriteOrder(None))
            return answer

        answer = await eventually(
            retry,
            lambda r: isinstance(r, chat_pb2.SendMessageResponse),
            within_s=10,
            what="m1's retry acked",
        )
        assert isinstance(answer, chat_pb2.SendMessageResponse), (answer, await redis.get(key))
    finally:
        hot_a.claim_many = claim_a  # type: ignore[method-assign]
        await other.settle_many([(held.held((tenant, conversation, m2)), None)])
        for task in leasing:
            task.cancel()
        await a.drain(10)
        await producer.stop()
        await redis.aclose()


@pytest.mark.parametrize("digest", ["", "0123abcd0123abcd"])
async def test_review_s8_the_taken_over_owners_late_settle_keeps_the_takers_ack(
    system: System, tenant: str, digest: str
) -> None:
    """_CLAIM_OPEN_IF_READY says of a takeover: "this attempt's ack is the one recorded". A process
    that only stalled past its lease (GC, CPU starvation, a paused VM; its record was in its
    producer already) settles later, and its ack replaces the taker's: retries from then on are
    answered an event id other than the one the taker's caller got, and here not the one the
    sessions fold and ClickHouse keep either (the first write, lowest offset, of the partition).
    With a text digest in the ack (review, twenty-fifth session: the guard matched the offsets at
    the value's end, which a digest now is, and overwrote)."""
    redis = aioredis.Redis.from_url(system.settings.redis_url)
    partitions = system.settings.topic_partitions
    stalled, taker = IngressHotView(redis, 3600), IngressHotView(redis, 3600)
    try:
        await taker.renew_lease()
        await stalled.renew_lease(0.3)  # its last renewal before the stall
        conversation = f"c-{uuid.uuid4().hex[:8]}"
        await redis.hset(hv.conversation_key(tenant, conversation), hv.F_CREATED_NS, 1)
        key = (tenant, conversation, "m")
        (mine,) = await stalled.claim_many([key], partitions, unless_closed=True)
        assert mine.claimed
        (taken,) = await eventually(
            lambda: taker.claim_many([key], partitions, unless_closed=True, take_over=True),
            lambda claims: claims[0].claimed,
            within_s=5,
            what="the stalled process's claim taken over",
        )
        ack_taker = Ack(str(uuid.uuid4()), 0, 7, digest)  # first in the log
        await taker.settle_many([(taken.held(key), ack_taker)])
        late = Ack(str(uuid.uuid4()), 0, 11, digest[::-1])  # landed after
        await stalled.settle_many([(mine.held(key), late)])
        recorded = await redis.get(hv.idempotency_key(*key))
        assert recorded == hv.encode_claim(*astuple(ack_taker)).encode(), recorded
    finally:
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_review_s8_a_process_with_a_stale_lease_hands_no_agent_message_to_kafka(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """README: "A process whose renewals failed for 6 s hands no claimed message to Kafka
    (UNAVAILABLE, retry) until one succeeds again": another process may be taking its claims
    over by then. Customer messages are refused so; an agent's message (claimed the same way,
    hv.agent_claim) is written."""
    s = system.settings
    conversation = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    producer = EventProducer(s)
    await producer.start()
    hot = IngressHotView(redis, s.idempotency_ttl_s)
    await hot.renew_lease()  # and no renewal since (Redis away from this process, its loop stalled)
    writes = ConversationWrites(s, producer, hot, stub_read)
    try:
        await eventually(
            lambda: asyncio.sleep(0, hot.lease_fresh()),
            lambda fresh: not fresh,
            within_s=30,
            what="a stale lease",
        )
        (customer,) = await writes.accept_messages(
            [message(tenant, conversation, "c1")], "", WriteOrder(None)
        )
        assert not isinstance(customer, chat_pb2.SendMessageResponse), customer  # the fence holds here
        event = new_event(
            tenant,
            conversation,
            agent_message_sent=events_pb2.AgentMessageSent(
                agent_id="agent-1", client_message_id="a1", text="hi"
            ),
        )
        try:
            ack, _ = await writes.publish_claimed(event, (tenant, conversation, hv.agent_claim("a1")))
        except RequestRejected as refused:
            assert refused.code == grpc.StatusCode.UNAVAILABLE, refused
        else:
            raise AssertionError(f"an agent message was handed to Kafka with a stale lease: {ack}")
    finally:
        await writes.drain(10)
        await producer.stop()
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_review_s8_a_failed_retry_of_a_dead_processs_durable_close_does_not_reopen_sends(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """Process A's close is durable in Kafka; A dies before it records that in Redis (its hold
    stays, its CLOSE claim stays pending). Its supervisor ends its lease. The
    client retries the close at B, which takes the CLOSE claim over, holds, and fails to publish
    (Kafka away from B, or other processes' messages not settled within the produce timeout): B
    releases the hold. A send at C is then acked, after the close in the log, and the fold drops
    it. Before the takeover, A's claim and hold refused both for 120 s, and the sessions worker
    marked the conversation closed from the log meanwhile."""
    s = system.settings
    conversation = await start(stub, tenant)
    redis = aioredis.Redis.from_url(s.redis_url)
    good = [EventProducer(s), EventProducer(s)]
    for p in good:
        await p.start()
    away = EventProducer(s.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"}))  # Kafka away from B
    lease_a = new_lease_id()
    hot_a = IngressHotView(redis, s.idempotency_ttl_s, lease_id=lease_a)
    hot_b, hot_c = IngressHotView(redis, s.idempotency_ttl_s), IngressHotView(redis, s.idempotency_ttl_s)
    for h in (hot_a, hot_b, hot_c):
        await h.renew_lease()
    leasing = [asyncio.ensure_future(h.keep_lease()) for h in (hot_b, hot_c)]
    a = ConversationWrites(s, good[0], hot_a, stub_read)
    b = ConversationWrites(s, away, hot_b, stub_read)
    c = ConversationWrites(s, good[1], hot_c, stub_read)
    durable, never = asyncio.Event(), asyncio.Event()
    settle_a = hot_a.settle_many

    async def dies_before_recording(outcomes: Sequence[tuple[HeldClaim, Ack | None]], **kw: Any) -> None:
        if any(held.client_message_id == hv.CLOSE_CLAIM and ack is not None for held, ack in outcomes):
            durable.set()  # Kafka acked the close: it is in the log; A dies before recording it
            await never.wait()
        await settle_a(outcomes, **kw)

    hot_a.settle_many = dies_before_recording  # type: ignore[method-assign]
    sessions = system.children["sessions"].proc
    assert sessions is not None
    os.killpg(sessions.pid, signal.SIGSTOP)  # lagging: it has not folded A's close yet
    close = chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=conversation)
    closing = asyncio.ensure_future(a.close_conversation(close))
    try:
        await asyncio.wait_for(durable.wait(), 30)
        await end_lease(redis, lease_a)  # what `switchboard ingress` does once A exited
        with pytest.raises(RequestRejected):
            await b.close_conversation(close)
        (late,) = await c.accept_messages(
            [message(tenant, conversation, "after-close")], "", WriteOrder(None)
        )
        assert not isinstance(late, chat_pb2.SendMessageResponse), (
            f"a message acked after the conversation's close in the log: {late}"
        )
    finally:
        os.killpg(sessions.pid, signal.SIGCONT)
        never.set()
        closing.cancel()
        for task in leasing:
            task.cancel()
        for w in (a, b, c):
            await w.drain(10)
        for p in (*good, away):
            await p.stop()
        await redis.aclose()
