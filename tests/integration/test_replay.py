"""Replay on the real stack: rebuilt projections and hot view are identical (row counts and
checksums over every table; every state, live stream and queue) to what the live processors
built; a swap while the system serves loses nothing; a replay through the S3 archive after Kafka
deleted the records gives the same projections."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.records_to_delete import RecordsToDelete

from schemas import hotview as hv
from schemas.events import encode_event, event_headers, event_key
from services.analytics import DATABASE
from services.settings import Settings
from streams.archive import ArchiveStore, archiver_consumer
from streams.replay import (
    ReplayOptions,
    clickhouse_client,
    kafka_offsets,
    plan_replay,
    replay,
    table_checksums,
)
from streams.replay._sessions import redis_for
from streams.replay.workload import mixed_workload
from tests.conftest import System, eventually

pytestmark = pytest.mark.integration


async def produce_workload(settings: Settings, tenant: str, conversations: int, seed: int) -> int:
    """The mixed workload straight onto the log (as the ingress and the assistant write it), plus
    one undecodable record that every processor refuses (dead-lettered live, refused by replay)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        events = mixed_workload(tenant, conversations, seed)
        for event in events:
            await producer.send(
                settings.conversation_topic,
                key=event_key(event),
                value=encode_event(event),
                headers=event_headers(event),
            )
        await producer.send(
            settings.conversation_topic, key=f"{tenant}-poison".encode(), value=b"\xffnot an event"
        )
        await producer.flush()
        return len(events)
    finally:
        await producer.stop()


async def committed(settings: Settings, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        _, ends = await kafka_offsets(settings, topic)
        out = {}
        for p in ends:
            out[p] = (await consumer.committed(TopicPartition(topic, p))) or 0
        return out
    finally:
        await consumer.stop()


async def projector_caught_up(settings: Settings) -> dict[int, int]:
    """Wait until the live projector has committed Kafka's end offsets; returns them."""
    _, ends = await kafka_offsets(settings, settings.conversation_topic)
    await eventually(
        lambda: committed(settings, "switchboard-projector", settings.conversation_topic),
        lambda got: all(got.get(p, 0) >= e for p, e in ends.items()),
        within_s=120,
        what="the live projector reaching the log end",
    )
    return ends


async def sessions_caught_up(settings: Settings) -> dict[int, int]:
    _, ends = await kafka_offsets(settings, settings.conversation_topic)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await eventually(
            lambda: redis.hgetall(hv.APPLIED_KEY),
            lambda got: all(int(got.get(str(p).encode(), 0)) >= e for p, e in ends.items()),
            within_s=120,
            what="the sessions worker reaching the log end",
        )
    finally:
        await redis.aclose()
    return ends


def live_checksums(settings: Settings) -> dict[str, tuple[int, int]]:
    client = clickhouse_client(settings)
    try:
        return table_checksums(client, DATABASE)
    finally:
        client.close()


@pytest.fixture(scope="module")
async def workload(system: System) -> str:
    tenant = f"rp{uuid.uuid4().hex[:8]}"
    await produce_workload(system.settings, tenant, 150, seed=11)
    return tenant


@pytest.mark.timeout(300)
async def test_replay_from_the_beginning_rebuilds_identical_projections_and_hot_view(
    system: System, workload: str
) -> None:
    settings = system.settings
    await projector_caught_up(settings)
    await sessions_caught_up(settings)
    live = await asyncio.to_thread(live_checksums, settings)
    assert live["raw_events"][0] > 0 and live["conversation_facts"][0] > 0

    # Traffic goes on while the replays run: each compares at the live processor's position.
    traffic = asyncio.ensure_future(produce_workload(settings, f"lt{uuid.uuid4().hex[:8]}", 100, seed=21))
    summaries = await replay(settings, ReplayOptions(target="projections", swap=False))
    (projections,) = summaries
    assert projections.identical, projections.differences
    assert projections.rejected >= 1  # the poison record, refused like the live projector did
    live_redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await live_redis.set("replay-test-sentinel", "1")
        states = await _states(live_redis, workload)
        sessions = (await replay(settings, ReplayOptions(target="sessions", swap=False)))[0]
        # The live hot view was left alone; the rebuild is in its own database.
        assert await live_redis.get("replay-test-sentinel") == b"1"
        assert await _states(live_redis, workload) == states
    finally:
        await live_redis.aclose()
    await traffic
    assert sessions.identical, sessions.differences
    assert sessions.events > 0 and len(states) == 150
    scratch = redis_for(settings, settings.replay_redis_db)
    try:
        assert await scratch.get("replay-test-sentinel") is None
        assert await _states(scratch, workload) == states
    finally:
        await scratch.aclose()

    # The rebuilt tables really are separate and complete: same numbers table by table.
    await projector_caught_up(settings)
    (again,) = await replay(settings, ReplayOptions(target="projections", swap=False))
    assert again.identical, again.differences
    client = clickhouse_client(settings)
    try:
        rebuilt = table_checksums(client, settings.replay_database)
        live = table_checksums(client, DATABASE)
    finally:
        client.close()
    assert rebuilt == live
    assert set(live) >= {
        "raw_events",
        "raw_messages",
        "raw_replies",
        "raw_intents",
        "raw_handoffs",
        "raw_csat",
    }


@pytest.mark.timeout(400)
async def test_projections_swap_while_the_system_serves_loses_nothing(system: System, workload: str) -> None:
    settings = system.settings
    tenant = f"sw{uuid.uuid4().hex[:8]}"
    # Traffic keeps arriving while the replay rebuilds and swaps.
    traffic = asyncio.ensure_future(produce_workload(settings, tenant, 300, seed=5))
    # Rows built by two processes here (the other tests build them in this one).
    (summary,) = await replay(settings, ReplayOptions(target="projections", workers=2))
    await traffic
    assert summary.swapped and summary.events > 0
    await projector_caught_up(settings)
    # The live tables after the swap are exactly what a fresh rebuild of the whole log gives.
    (check,) = await replay(settings, ReplayOptions(target="projections", swap=False))
    assert check.identical, check.differences
    client = clickhouse_client(settings)
    try:
        # The live materialized views feed the swapped-in tables.
        counted = client.query(
            f"SELECT count() FROM {DATABASE}.events WHERE tenant_id = {{t:String}}", parameters={"t": tenant}
        ).result_rows[0][0]
    finally:
        client.close()
    assert counted == len(mixed_workload(tenant, 300, 5))


@pytest.mark.timeout(400)
async def test_sessions_swap_with_the_worker_stopped_then_it_resumes(system: System, workload: str) -> None:
    settings = system.settings
    await sessions_caught_up(settings)
    # Refused while the worker runs.
    with pytest.raises(Exception, match="sessions worker is running"):
        await replay(settings, ReplayOptions(target="sessions"))
    system.children["sessions"].stop()
    await eventually(
        lambda: _members(settings, "switchboard-sessions"), lambda n: n == 0, within_s=60, what="group empty"
    )
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        before = await _states(redis, workload)
        (summary,) = await replay(settings, ReplayOptions(target="sessions"))
        assert summary.swapped
        assert await _states(redis, workload) == before
        # Writes wait for the worker: readiness is not set by the replay.
        assert await redis.hlen(hv.READY_KEY) == 0
        tenant = f"ss{uuid.uuid4().hex[:8]}"
        await produce_workload(settings, tenant, 20, seed=9)
        await system.start_children("sessions")
        await sessions_caught_up(settings)
        await eventually(
            lambda: redis.hlen(hv.READY_KEY),
            lambda n: n >= settings.topic_partitions,
            what="partitions ready",
        )
        after = await _states(redis, tenant)
        assert len(after) == 20
    finally:
        await redis.aclose()
        await system.start_children("sessions")
    (check,) = await replay(settings, ReplayOptions(target="sessions", swap=False))
    assert check.identical, check.differences


async def _members(settings: Settings, group: str) -> int:
    from streams.replay._sessions import group_members

    return await group_members(settings, group)


async def _states(redis: aioredis.Redis, tenant: str) -> dict[bytes, bytes | str | None]:
    out: dict[bytes, bytes | str | None] = {}
    async for key in redis.scan_iter(match=f"sb:{{{tenant}:*:conv", count=1000):
        out[key] = await redis.hget(key, hv.F_STATE)
    return out


@pytest.mark.timeout(400)
async def test_replay_through_the_archive_after_kafka_deleted_the_records(
    system: System, workload: str
) -> None:
    """A copy of the whole log in its own topic (same partitions and offsets), archived, then
    deleted from Kafka: a replay from the beginning reads it all from S3 and rebuilds projections
    identical to the live ones."""
    settings = system.settings
    ends = await projector_caught_up(settings)
    topic = f"replay-archive-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=len(ends), replication_factor=1)])
        await _copy_topic(settings, settings.conversation_topic, topic, ends)
        _, copied = await kafka_offsets(settings, topic)
        assert copied == ends  # same offsets: the rows' partition/offset columns match

        store = ArchiveStore(settings)
        consumer, _ = archiver_consumer(settings, store, topic)
        await consumer.start()
        task = asyncio.ensure_future(consumer.run())
        try:
            await eventually(
                lambda: asyncio.gather(
                    *(asyncio.to_thread(store.next_offset, topic, p) for p in sorted(ends))
                ),
                lambda got: all((n or 0) >= ends[p] for p, n in zip(sorted(ends), got, strict=True)),
                within_s=120,
                what="the copy archived",
            )
        finally:
            await consumer.stop()
            await task
            await consumer.close()

        await admin.delete_records(
            {TopicPartition(topic, p): RecordsToDelete(before_offset=e) for p, e in ends.items()},
            timeout_ms=30_000,
        )
        starts, _ = await kafka_offsets(settings, topic)
        assert starts == ends  # Kafka holds nothing of it any more

        plan = await plan_replay(settings, store, topic)
        assert plan.from_archive == sum(ends.values())
        with pytest.raises(Exception, match="not in the S3 archive"):
            await plan_replay(settings, None, topic, from_offset=0)
        (summary,) = await replay(settings, ReplayOptions(target="projections", swap=False, topic=topic))
        assert summary.from_archive == sum(ends.values())
        assert summary.identical, summary.differences
    finally:
        await admin.close()


async def _copy_topic(settings: Settings, source: str, dest: str, ends: dict[int, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=10
    )
    await consumer.start()
    await producer.start()
    try:
        for p, end in ends.items():
            tp = TopicPartition(source, p)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            position = 0
            while position < end:
                for records in (await consumer.getmany(tp, timeout_ms=1000, max_records=5000)).values():
                    for r in records:
                        if r.offset >= end:
                            break
                        assert r.offset == position, "the source topic has an offset gap"
                        await producer.send(
                            dest,
                            key=r.key,
                            value=r.value,
                            partition=p,
                            timestamp_ms=r.timestamp,
                            headers=list(r.headers or ()),
                        )
                        position += 1
            await producer.flush()
    finally:
        await producer.stop()
        await consumer.stop()


@pytest.mark.timeout(300)
async def test_knowledge_replay_restores_the_documents_the_assistant_wrote(system: System) -> None:
    from switchboard.v1 import knowledge_pb2

    from schemas.events import now_timestamp

    settings = system.settings
    tenant = f"kb{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i, kind in enumerate(["upsert", "upsert", "upsert", "delete"]):
            record = knowledge_pb2.KnowledgeEvent(event_id=str(uuid.uuid4()), tenant_id=tenant)
            if kind == "upsert":
                record.document_upserted.CopyFrom(
                    knowledge_pb2.Document(
                        document_id=f"d{i}", title=f"退货政策 {i}", body="七天无理由退货。"
                    )
                )
            else:
                record.document_deleted = "d0"  # keyed by its document: same partition, after the upsert
            record.occurred_at.CopyFrom(now_timestamp())
            await producer.send(
                settings.knowledge_topic,
                key=f"{tenant}/d{i if kind == 'upsert' else 0}".encode(),
                value=record.SerializeToString(),
            )
        await producer.flush()
    finally:
        await producer.stop()
    redis = aioredis.Redis.from_url(settings.redis_url)
    key = hv.documents_key(tenant)
    try:
        live = await eventually(
            lambda: redis.hgetall(key), lambda docs: set(docs) == {b"d1", b"d2"}, what="the assistant's fold"
        )
        # Redis loses the tenant's documents and gains one the log never had.
        await redis.delete(key)
        await redis.hset(key, "stray", b"not from the log")
        (summary,) = await replay(settings, ReplayOptions(target="knowledge", tenant=tenant))
        assert summary.swapped and summary.events == 4
        assert await redis.hgetall(key) == live
    finally:
        await redis.aclose()


@pytest.mark.timeout(300)
async def test_the_replay_command_dry_run_says_what_it_would_read(system: System, workload: str) -> None:
    import os
    import subprocess
    import sys

    _, ends = await kafka_offsets(system.settings, system.settings.conversation_topic)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "replay", "--target", "projections", "--dry-run"],
        env={**os.environ, **system.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "projections (dry run)" in done.stdout
    for p, end in ends.items():
        assert f"partition {p}: offsets 0..{end - 1}" in done.stdout
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "replay", "--target", "sessions", "--from-offset", "5"],
        env={**os.environ, **system.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "from the beginning" in refused.stderr
    # A negative offset or worker count is a typo, not "everything" (it re-projected the whole log,
    # silently: trial, twenty-ninth session).
    for bad, says in (("--from-offset=-5", "negative"), ("--workers=-1", "negative")):
        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.cli", "replay", "--target", "projections", "--dry-run", bad],
            env={**os.environ, **system.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1 and says in refused.stderr, (bad, refused.stderr)
