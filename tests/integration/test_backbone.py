"""Issue 5's findings on the processors, each on real servers: hostile ids, poison records,
liveness after a kill -9, and a Redis that loses everything while the system runs."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from switchboard.v1 import chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import encode_event, new_event
from tests.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration

# Every processor of the conversation topic sets a poison record aside on its own.
PROCESSORS = ("sessions", "projector", "assistant")


def send(
    tenant: str, conversation_id: str, text: str, cmid: str | None = None
) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant,
        conversation_id=conversation_id,
        client_message_id=cmid or uuid.uuid4().hex,
        text=text,
    )


async def get(stub, tenant: str, conversation_id: str, recent: int = 20) -> chat_pb2.Conversation | None:
    try:
        return await stub.GetConversation(
            chat_pb2.GetConversationRequest(
                tenant_id=tenant, conversation_id=conversation_id, recent_messages=recent
            )
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None
        raise


async def send_when_ready(
    stub, request: chat_pb2.SendMessageRequest, within_s: float = 60
) -> chat_pb2.SendMessageResponse:
    """SendMessage, retrying UNAVAILABLE (the hot view being rebuilt) like a careful client."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await stub.SendMessage(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def conversation_ids_per_partition(prefix: str, partitions: int) -> list[str]:
    """One conversation id for each partition (the Kafka key is the id)."""
    partitioner = DefaultPartitioner()
    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        cid = f"{prefix}-{i}"
        found.setdefault(partitioner(cid.encode(), list(range(partitions)), list(range(partitions))), cid)
        i += 1
    return [found[p] for p in range(partitions)]


# Tenant ids named like the fields of the state layouts, and conversation ids with separators
# and at their maximum length: none may be mistaken for a field, and none may stop anyone else.
HOSTILE_TENANTS = ["conversation_id", "tenant_id", "status", "metadata", "state", "recent_client_message_ids"]
HOSTILE_CONVERSATIONS = ["a:b:c", "x" * 128, "sb:t:c:conv", "1", "tenant_id", "last_offset:1"]


async def test_ids_named_like_fields_or_full_of_separators_never_stop_the_processors(
    system: System, stub, tenant: str
) -> None:
    suffix = uuid.uuid4().hex[:6]
    pairs = []
    for t in HOSTILE_TENANTS:
        tenant_id = f"{t}"
        for c in HOSTILE_CONVERSATIONS:
            cid = (c + suffix)[-128:] if len(c) + len(suffix) > 128 else c + suffix
            pairs.append((tenant_id, await start_conversation(stub, tenant_id, conversation_id=cid)))
    for tenant_id, cid in pairs:
        await stub.SendMessage(send(tenant_id, cid, f"hello from {tenant_id}", cmid="m1"))
    # Someone else afterwards: their messages are folded and projected too.
    other = await start_conversation(stub, tenant)
    await stub.SendMessage(send(tenant, other, "after the hostile ids", cmid="after"))
    for tenant_id, cid in [*pairs, (tenant, other)]:
        conv = await eventually(
            functools.partial(get, stub, tenant_id, cid),
            lambda c: c is not None and c.message_count == 1,
            within_s=30,
            what=f"{tenant_id}/{cid} folded",
        )
        assert conv is not None and conv.tenant_id == tenant_id and conv.conversation_id == cid
    # Each (tenant, id) is its own conversation: the same id under two tenants is two states.
    assert len({(t, c) for t, c in pairs}) == len(pairs)


async def test_poison_records_go_to_the_dead_letter_topic_and_the_partition_moves_on(
    system: System, stub, tenant: str
) -> None:
    settings = system.settings
    conversation_id = await start_conversation(stub, tenant)
    key = conversation_id.encode()
    no_payload = events_pb2.Event(
        event_id=str(uuid.uuid4()), tenant_id=tenant, conversation_id=conversation_id
    )
    poison = [b"\xff\x00 not protobuf", no_payload.SerializeToString(), b""]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sources = []
        for value in poison:
            meta = await producer.send_and_wait(settings.conversation_topic, key=key, value=value)
            sources.append(f"{settings.conversation_topic}/{meta.partition}/{meta.offset}")
        # A good event written straight to the log after the poison, on the same partition.
        good = new_event(
            tenant,
            conversation_id,
            message_received=events_pb2.MessageReceived(client_message_id="g1", text="ok"),
        )
        await producer.send_and_wait(settings.conversation_topic, key=key, value=encode_event(good))
    finally:
        await producer.stop()
    await stub.SendMessage(send(tenant, conversation_id, "after the poison", cmid="g2"))

    conv = await eventually(
        lambda: get(stub, tenant, conversation_id),
        lambda c: c is not None and c.message_count == 2,
        within_s=30,
        what="the messages after the poison folded",
    )
    assert conv is not None and [m.client_message_id for m in conv.messages] == ["g1", "g2"]

    # Both processors set each poison record aside, with where it came from and why.
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    seen: set[tuple[str, str]] = set()
    try:
        tp = TopicPartition(settings.dead_letter_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {(p, s) for p in PROCESSORS for s in sources} <= seen:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for rec in batch.get(tp, []):
                headers = {k: v.decode() for k, v in rec.headers}
                if headers.get("sb-dlq-source") in sources:
                    assert headers["sb-dlq-reason"]
                    assert headers["sb-dlq-partition"] and headers["sb-dlq-offset"]
                    seen.add((headers["sb-dlq-processor"], headers["sb-dlq-source"]))
    finally:
        await consumer.stop()
    assert seen == {(p, s) for p in PROCESSORS for s in sources}


@pytest.mark.timeout(300)
async def test_every_partition_is_applied_within_seconds_of_a_restart_after_kill_9(
    system: System, stub, tenant: str
) -> None:
    settings = system.settings
    ids = conversation_ids_per_partition(f"live-{uuid.uuid4().hex[:6]}", settings.topic_partitions)
    for cid in ids:
        await start_conversation(stub, tenant, conversation_id=cid)
    system.children["sessions"].kill()
    system.children["analytics"].kill()
    # Written while the processors are dead, so they are waiting when the processors come back.
    for cid in ids:
        await stub.SendMessage(send(tenant, cid, "while down", cmid="down"))
    started = time.monotonic()
    await system.start_children("analytics", "sessions")
    lags = []
    for cid in ids:
        await eventually(
            functools.partial(get, stub, tenant, cid),
            lambda c: c is not None and c.message_count == 1,
            within_s=60,
        )
        lags.append(time.monotonic() - started)
    # Written right after the restart: applied within the liveness bound.
    acked = {}
    for cid in ids:
        await stub.SendMessage(send(tenant, cid, "after restart", cmid="up"))
        acked[cid] = time.monotonic()
    for cid in ids:
        await eventually(
            functools.partial(get, stub, tenant, cid),
            lambda c: c is not None and c.message_count == 2,
            within_s=30,
        )
        lag = time.monotonic() - acked[cid]
        assert lag < 5.0, f"{cid}: applied {lag:.1f}s after its ack"
    print(f"records written while down applied {max(lags):.1f}s after the restart began")


@pytest.mark.timeout(300)
async def test_redis_losing_everything_heals_states_claims_and_live_streams(
    system: System, stub, tenant: str
) -> None:
    conversation_id = await start_conversation(stub, tenant, customer_id="c-heal")
    acks = [await stub.SendMessage(send(tenant, conversation_id, f"m{i}", cmid=f"h{i}")) for i in range(3)]
    await eventually(
        lambda: get(stub, tenant, conversation_id),
        lambda c: c is not None and c.message_count == 3,
        within_s=30,
    )
    client = aioredis.Redis.from_url(system.settings.redis_url)
    try:
        await client.flushall()
        # The worker notices on its own (no restart) and rebuilds every partition from the log.
        await eventually(
            lambda: client.hlen(hv.READY_KEY),
            lambda n: n >= system.settings.topic_partitions,
            within_s=60,
            what="the hot view rebuilt",
        )
    finally:
        await client.aclose()
    healed = await get(stub, tenant, conversation_id)
    assert healed is not None and healed.message_count == 3 and healed.customer_id == "c-heal"
    assert [m.client_message_id for m in healed.messages] == ["h0", "h1", "h2"]
    # The idempotency claims came back with the log: a retry gets the first ack.
    retry = await send_when_ready(stub, send(tenant, conversation_id, "m1", cmid="h1"))
    assert retry.duplicate and (retry.partition, retry.offset) == (acks[1].partition, acks[1].offset)
    # The live stream is whole again: from the start it has the start and the three messages.
    stream = stub.StreamConversation(
        chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=conversation_id)
    )
    kinds = []
    async for update in stream:
        kinds.append(update.event.WhichOneof("payload"))
        if len(kinds) == 4:
            stream.cancel()
            break
    assert kinds == ["conversation_started", *["message_received"] * 3]
