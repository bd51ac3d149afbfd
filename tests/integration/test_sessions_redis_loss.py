"""The sessions worker's write gate (`hv.READY_KEY`) and positions when Redis loses data, goes
back to an earlier point, or the worker restarts mid-rebuild: the gate never opens before the
claims of everything acknowledged are back, and never stays shut once they are.

The first two tests run a real worker (the same `SessionsProcessor` and `BatchConsumer` the
`sessions` process runs) in the test process on a topic and a Redis database of their own, so
what they set up in Kafka and Redis is independent of the other tests (empty partitions stay
empty); the third runs on the session's system through the gRPC API."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from schemas import hotview as hv
from schemas.events import encode_event, new_event
from services.settings import Settings
from streams._consumer import BatchConsumer
from streams.sessions._worker import SessionsProcessor
from tests.conftest import System, eventually

pytestmark = pytest.mark.integration

PARTITIONS = 4


@contextlib.asynccontextmanager
async def own_log(base: Settings, db: int) -> AsyncIterator[tuple[Settings, aioredis.Redis]]:
    """A fresh topic and an emptied Redis database for a worker run by the test."""
    topic = f"sessions-loss-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=base.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()
    settings = base.model_copy(
        update={
            "conversation_topic": topic,
            "topic_partitions": PARTITIONS,
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{db}",
        }
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    await redis.flushdb()
    try:
        yield settings, redis
    finally:
        await redis.flushdb()
        await redis.aclose()


@contextlib.asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[SessionsProcessor]:
    """A sessions worker in its own consumer group (the system's worker never sees this topic)."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    processor = SessionsProcessor(settings, redis)
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id=f"test-sessions-{uuid.uuid4().hex[:8]}",
        batch_size=settings.batch_size,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run())
    try:
        yield processor
    finally:
        await consumer.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await consumer.close()
        await redis.aclose()


async def produce(settings: Settings, events: list[tuple[int, events_pb2.Event]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20)
    await producer.start()
    try:
        for partition, event in events:
            await producer.send(
                settings.conversation_topic,
                encode_event(event),
                key=event.conversation_id.encode(),
                partition=partition,
            )
        await producer.flush()
    finally:
        await producer.stop()


async def position(redis: aioredis.Redis, partition: int) -> int:
    raw = await redis.hget(hv.APPLIED_KEY, str(partition))
    return -1 if raw is None else int(raw)


FILLER = 5_000


@pytest.mark.timeout(180)
async def test_a_worker_started_mid_rebuild_keeps_the_gate_shut_until_the_rebuild_is_done(
    local_stack: Settings,
) -> None:
    """Review finding: `_take` marked a partition ready as soon as Redis had a position for it,
    but during a rebuild the position is written after every batch while the rebuild's target
    lived only in memory. A worker killed (or a partition rebalanced) mid-rebuild came back with
    the gate open before the claims were restored, and a retry of an acknowledged message wrote
    a second copy."""
    async with own_log(local_stack, db=11) as (settings, redis):
        tenant, filler, conversation = f"t{uuid.uuid4().hex[:8]}", "filler", "c1"
        # Partition 0: cheap events of one conversation, then a conversation whose messages
        # carry idempotency claims, at the end of what the rebuild must reach.
        events = [
            (0, new_event(tenant, filler, csat_rated=events_pb2.CsatRated(score=1 + i % 5)))
            for i in range(FILLER)
        ]
        events.append(
            (0, new_event(tenant, conversation, conversation_started=events_pb2.ConversationStarted()))
        )
        events += [
            (
                0,
                new_event(
                    tenant,
                    conversation,
                    message_received=events_pb2.MessageReceived(client_message_id=f"m{i}", text="hi"),
                ),
            )
            for i in range(3)
        ]
        await produce(settings, events)
        end = len(events)
        claim = hv.idempotency_key(tenant, conversation, "m2")
        # What a worker leaves when it is killed during a rebuild after Redis lost everything:
        # the rebuild's target, the position of its first batch, no READY entry for the
        # partition, none of the hot view above that position. (The other partitions are empty
        # and ready.)
        await redis.hset(hv.REBUILDING_KEY, "0", str(end))
        await redis.hset(hv.APPLIED_KEY, "0", "1")
        await redis.hset(hv.READY_KEY, mapping={str(p): "1" for p in range(1, PARTITIONS)})

        async with worker(settings):
            deadline = time.monotonic() + 120
            while True:
                # One snapshot: the gate, the position and the claim a retry of m2 would need.
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hget(hv.READY_KEY, "0")
                    pipe.hget(hv.APPLIED_KEY, "0")
                    pipe.exists(claim)
                    ready, applied, claimed = await pipe.execute()
                if ready is not None:
                    break
                assert time.monotonic() < deadline, f"partition 0 never ready; position {applied!r} of {end}"
                await asyncio.sleep(0.005)  # polling finely: the window of a wrong gate is short
            assert int(applied) >= end, f"the gate opened at position {int(applied)} of {end}"
            assert claimed == 1, "the gate opened before the claim of an acknowledged message was back"
            assert await redis.hexists(hv.REBUILDING_KEY, "0") == 0  # the rebuild is done


@pytest.mark.timeout(120)
async def test_an_empty_partition_is_ready_again_after_redis_loses_everything(local_stack: Settings) -> None:
    """Review finding: after Redis lost everything, only partitions the worker had written a
    position for were noticed and rebuilt; one that never had a record stayed without its READY
    entry, and the ingress refused every write until the worker restarted."""
    async with own_log(local_stack, db=12) as (settings, redis), worker(settings):
        await eventually(
            lambda: redis.hlen(hv.READY_KEY), lambda n: n == PARTITIONS, within_s=60, what="all ready"
        )
        tenant = f"t{uuid.uuid4().hex[:8]}"
        await produce(
            settings, [(0, new_event(tenant, "c1", conversation_started=events_pb2.ConversationStarted()))]
        )
        await eventually(lambda: position(redis, 0), lambda p: p == 1, within_s=30, what="applied")

        await redis.flushdb()  # Redis restarted empty; no traffic arrives

        ready = await eventually(
            lambda: redis.hgetall(hv.READY_KEY),
            lambda r: len(r) == PARTITIONS,
            within_s=15,
            what="every partition ready again with no traffic",
        )
        assert set(ready) == {str(p).encode() for p in range(PARTITIONS)}
        state = await redis.hget(hv.conversation_key(tenant, "c1"), hv.F_STATE)
        assert state is not None  # partition 0 was rebuilt


def send(tenant: str, conversation_id: str, client_message_id: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation_id, client_message_id=client_message_id, text="hello"
    )


async def stream_ids(redis: aioredis.Redis, key: str) -> list[str]:
    entries: Any = await redis.xrange(key)
    return [eid.decode() for eid, _ in entries]


async def caught_up(redis: aioredis.Redis, settings: Settings, partition: int) -> int:
    """Wait until the worker applied partition's log to its end; returns the position."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(settings.conversation_topic, partition)
        end = int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()
    return await eventually(
        lambda: position(redis, partition),
        lambda p: p >= end,
        within_s=60,
        what=f"partition {partition} applied",
    )


@pytest.mark.timeout(180)
async def test_a_redis_restored_to_an_earlier_point_is_caught_up(
    system: System, stub: chat_pb2_grpc.ChatServiceStub, tenant: str
) -> None:
    """Review finding: a worker that saw a position it had not written (Redis restored from an
    earlier snapshot, a failover that lost the last writes) adopted the older position but never
    re-read the log from it: the messages in between stayed missing from the hot view, their
    claims gone (a retry wrote a second copy), and the write gate stayed open."""
    settings = system.settings
    conversation_id = (
        await stub.StartConversation(chat_pb2.StartConversationRequest(tenant_id=tenant))
    ).conversation_id
    first = await stub.SendMessage(send(tenant, conversation_id, "m0"))
    partition = first.partition
    redis = aioredis.Redis.from_url(settings.redis_url)
    key = hv.conversation_key(tenant, conversation_id)
    live = hv.live_stream_key(tenant, conversation_id)

    def get() -> chat_pb2.GetConversationRequest:
        return chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation_id)

    try:
        # T1: this conversation's keys and the partition's position, as a snapshot would hold them.
        await caught_up(redis, settings, partition)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hget(key, hv.F_STATE)
            pipe.hget(key, hv.F_CURSOR)
            pipe.hget(hv.APPLIED_KEY, str(partition))
            state_t1, cursor_t1, applied_t1 = await pipe.execute()
        before = (await stub.GetConversation(get())).message_count

        second = await stub.SendMessage(send(tenant, conversation_id, "m1"))
        assert not second.duplicate
        await caught_up(redis, settings, partition)
        after = (await stub.GetConversation(get())).message_count
        assert after > before

        # Redis goes back to T1 for this partition: what the worker applied since is gone.
        entries = await stream_ids(redis, live)
        newer = [eid for eid in entries if int(eid.split("-")[0]) >= int(applied_t1)]
        assert newer
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={hv.F_STATE: state_t1, hv.F_CURSOR: cursor_t1})
            pipe.xdel(live, *newer)
            # The stream's last id as it was then (XDEL keeps the newest id ever added).
            pipe.execute_command("XSETID", live, entries[len(entries) - len(newer) - 1])
            pipe.delete(hv.idempotency_key(tenant, conversation_id, "m1"))
            pipe.hset(hv.APPLIED_KEY, str(partition), applied_t1)
            await pipe.execute()

        # The worker applies the log again from the position Redis has: m1 is back in the hot
        # view, in the live stream and in its claim, and a retry of it finds its first write.
        healed = await eventually(
            lambda: stub.GetConversation(get()),
            lambda c: c.message_count >= after,
            within_s=20,
            what="m1 back in the hot view",
        )
        assert [m.client_message_id for m in healed.messages].count("m1") == 1
        await eventually(
            lambda: stream_ids(redis, live),
            lambda now: now[: len(entries)] == entries,
            within_s=20,
            what="the live stream whole again",
        )
        await eventually(
            lambda: redis.hlen(hv.READY_KEY),
            lambda n: n >= settings.topic_partitions,
            within_s=20,
            what="every partition ready",
        )
        retry = await stub.SendMessage(send(tenant, conversation_id, "m1"))
        assert retry.duplicate and (retry.partition, retry.offset) == (second.partition, second.offset)
    finally:
        await redis.aclose()
