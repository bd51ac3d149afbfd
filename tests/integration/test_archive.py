"""The cold archive on the real stack: the archiver keeps up with the log, `archive verify` and
restore give back Kafka's records, and kill -9 of the archiver mid-run leaves no gap, no overlap
and no half-written segment."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from switchboard.v1 import chat_pb2

from services.processes import Child
from services.settings import Settings
from streams._consumer import Record
from streams.archive import ArchiveStore, archiver_consumer, verify_archive
from streams.replay import PartitionPlan, ReplayPlan, kafka_offsets, read_log
from tests.conftest import System, eventually, start_conversation

pytestmark = pytest.mark.integration


async def create_topic(settings: Settings, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def kafka_records(settings: Settings, topic: str, partition: int, start: int, end: int) -> list[Record]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Record] = []
        while len(out) < end - start:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out.extend(
                    Record(topic, partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers or ()))
                    for r in records
                    if r.offset < end
                )
        return out
    finally:
        await consumer.stop()


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def archived_up_to(store: ArchiveStore, topic: str, partitions: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for p in partitions:
        nxt = await asyncio.to_thread(store.next_offset, topic, p)
        out[p] = nxt or 0
    return out


async def wait_archived(store: ArchiveStore, topic: str, ends: dict[int, int], within_s: float = 120) -> None:
    await eventually(
        lambda: archived_up_to(store, topic, sorted(ends)),
        lambda got: all(got[p] >= e for p, e in ends.items()),
        within_s=within_s,
        what=f"archive of {topic} reaching {ends}",
    )


@pytest.mark.timeout(300)
async def test_the_archiver_keeps_up_and_the_archive_gives_back_kafkas_records(
    system: System, stub, tenant: str
) -> None:
    settings = system.settings
    for i in range(20):
        cid = await start_conversation(stub, tenant, customer_id=f"c{i}")
        for j in range(3):
            await stub.SendMessage(
                chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=cid, client_message_id=f"m{j}", text=f"消息 {j} of {i}"
                )
            )
    _, ends = await kafka_offsets(settings, settings.conversation_topic)
    store = ArchiveStore(settings)
    await wait_archived(store, settings.conversation_topic, ends)

    reports = await asyncio.to_thread(verify_archive, store, settings.conversation_topic)
    assert reports and all(r.ok for r in reports), [r.problems for r in reports]
    for r in reports:
        assert r.first_offset == 0 and r.last_offset is not None and r.last_offset + 1 >= ends[r.partition]

    # The archive's records are Kafka's, byte for byte (key, value, headers, timestamp).
    busiest = max(ends, key=lambda p: ends[p])
    listing = await asyncio.to_thread(store.listing, settings.conversation_topic, busiest)
    plan = ReplayPlan(
        settings.conversation_topic,
        [PartitionPlan(busiest, 0, ends[busiest], ends[busiest], listing.manifests)],
    )
    plan.partitions[0].segments = [m for m in listing.manifests if m.first_offset < ends[busiest]]
    from_archive = [r async for batch in read_log(settings, store, plan) for r in batch]
    from_kafka = await kafka_records(settings, settings.conversation_topic, busiest, 0, ends[busiest])
    # Except what an erasure or a tenant's retention removed (streams/privacy; Kafka keeps it
    # until its own retention): exactly what a replay takes from Kafka.
    from streams.privacy._retention import replay_filter

    keep = await replay_filter(settings)
    from_kafka = [r for r in from_kafka if keep(r)]
    assert from_archive == from_kafka

    # The operator's commands agree.
    env = {**os.environ, **system.env}
    verify = await run_cli(env, "archive", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert all(p["ok"] and not p["problems"] for p in json.loads(verify.stdout))
    listed = await run_cli(env, "archive", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    segments = [row for row in json.loads(listed.stdout) if "orphan" not in row]
    # (Later segments may appear meanwhile: the archiver keeps running.)
    assert sum(row["count"] for row in segments) >= sum(r.records for r in reports)
    human = await run_cli(env, "archive", "list")
    assert human.returncode == 0 and "ratio" in human.stdout
    restored = await run_cli(
        env, "archive", "restore", "--partition", str(busiest), "--from-offset", "1", "--to-offset", "3"
    )
    assert restored.returncode == 0, restored.stderr
    lines = [json.loads(line) for line in restored.stdout.splitlines()]
    expected = [r for r in from_kafka if 1 <= r.offset <= 3]
    assert [line["offset"] for line in lines] == [r.offset for r in expected]
    assert [bytes.fromhex(line["value_hex"]) for line in lines] == [r.value for r in expected]

    # Restore into a topic: the same records (key, value, headers, timestamp) in the same partition.
    into = f"restored-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, into, settings.topic_partitions)
    restored = await run_cli(
        env,
        "archive",
        "restore",
        "--partition",
        str(busiest),
        "--from-offset",
        "0",
        "--to-offset",
        str(ends[busiest] - 1),
        "--into-topic",
        into,
    )
    assert restored.returncode == 0, restored.stderr
    copy = await kafka_records(settings, into, busiest, 0, len(from_kafka))
    assert [(r.key, r.value, r.headers, r.timestamp_ms) for r in copy] == [
        (r.key, r.value, r.headers, r.timestamp_ms) for r in from_kafka
    ]

    # Kafka out of reach: one line that says where a re-run resumes, not a traceback.
    refused = await run_cli(
        {**env, "SWITCHBOARD_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
        "archive",
        "restore",
        "--partition",
        str(busiest),
        "--from-offset",
        "2",
        "--to-offset",
        "3",
        "--into-topic",
        into,
    )
    assert refused.returncode == 1, refused
    assert "Traceback" not in refused.stderr, refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("switchboard archive restore:")]
    assert "Kafka failed" in line and "--from-offset 2" in line, line


@pytest.mark.timeout(400)
async def test_kill_9_of_the_archiver_mid_run_leaves_no_gap_no_overlap(system: System) -> None:
    settings = system.settings
    topic = f"archive-chaos-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, topic, 2)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    rng = random.Random(7)
    total = 12_000
    try:
        for i in range(total):
            # Text-like values of varying size: segments close at different offsets each run.
            value = (f"event {i} " + "customer message 你好 " * rng.randint(1, 30)).encode()
            await producer.send(topic, key=f"conv-{i % 97}".encode(), value=value, partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()
    _, ends = await kafka_offsets(settings, topic)
    assert sum(ends.values()) == total

    env = {
        **system.env,
        "SWITCHBOARD_CONVERSATION_TOPIC": topic,
        "SWITCHBOARD_ARCHIVE_SEGMENT_BYTES": "65536",
        "SWITCHBOARD_ARCHIVE_SEGMENT_AGE_S": "60",
        "SWITCHBOARD_WORKER_INSTANCE_ID": f"archiver-{topic}",
        # Small fetches: the archiver writes segment after segment for a while.
        "SWITCHBOARD_PROJECTOR_BATCH_SIZE": "200",
    }
    child = Child("archiver-chaos", ["worker", "archiver"], settings.data_dir / "logs" / f"{topic}.log", env)
    store = ArchiveStore(settings)
    kills = 0
    try:
        for _ in range(4):
            before = sum((await archived_up_to(store, topic, [0, 1])).values())
            child.start()
            # Kill it while it writes: once it has written something more than before.

            def progressed(got: dict[int, int], before: int = before) -> bool:
                return sum(got.values()) > before or sum(got.values()) >= total

            await eventually(
                lambda: archived_up_to(store, topic, [0, 1]),
                progressed,
                within_s=120,
                what="the archiver writing segments",
            )
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            child.kill()
            kills += 1
        # The last run closes what remains by age, and is stopped cleanly.
        final = Child(
            "archiver-chaos-final",
            ["worker", "archiver"],
            child.log_path,
            {**env, "SWITCHBOARD_ARCHIVE_SEGMENT_AGE_S": "1"},
        )
        final.start()
        try:
            await wait_archived(store, topic, ends, within_s=180)
        finally:
            final.stop()
    finally:
        child.kill()
    assert kills == 4
    got = await archived_up_to(store, topic, [0, 1])
    assert got == ends, child.log_tail()
    reports = await asyncio.to_thread(verify_archive, store, topic)
    assert [r.problems for r in reports] == [[], []]
    assert [(r.first_offset, r.last_offset, r.records) for r in reports] == [
        (0, ends[0] - 1, ends[0]),
        (0, ends[1] - 1, ends[1]),
    ]


async def test_the_archiver_resumes_from_what_s3_holds(system: System) -> None:
    """In process: a second archiver (a restart) continues after the last manifest, and a segment
    whose manifest was never written is overwritten, not trusted."""
    settings = system.settings
    topic = f"archive-resume-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(300):
            await producer.send(topic, key=b"k", value=f"v{i}".encode() * 40, partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    store = ArchiveStore(settings)
    # An orphan: a segment object where the next range starts, with no manifest (a crash between
    # the two PUTs). It must be ignored, then overwritten.
    first_settings = settings.model_copy(update={"archive_segment_bytes": 4096})

    async def run_once(until: int) -> None:
        consumer, _ = archiver_consumer(first_settings, store, topic)
        await consumer.start()
        task = asyncio.ensure_future(consumer.run())
        try:
            await wait_archived(store, topic, {0: until}, within_s=60)
        finally:
            await consumer.stop()
            await task
            await consumer.close()

    await run_once(100)
    nxt = await asyncio.to_thread(store.next_offset, topic, 0)
    assert nxt is not None and nxt >= 100
    orphan = f"{store.prefix}/{topic}/00000/{nxt:020d}.seg.zst"
    await asyncio.to_thread(store.put, orphan, b"half-written garbage", "application/zstd")
    listing = await asyncio.to_thread(store.listing, topic, 0)
    assert listing.orphans == [orphan]
    await run_once(300)
    reports = await asyncio.to_thread(verify_archive, store, topic)
    assert reports[0].problems == [] and reports[0].orphans == []
    assert (reports[0].first_offset, reports[0].last_offset, reports[0].records) == (0, 299, 300)


async def _retention_ms(settings: Settings) -> str:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, settings.conversation_topic)]
        )
        values = {str(e[0]): e[1] for r in described for res in r.resources for e in res[4]}
        return str(values["retention.ms"])
    finally:
        await admin.close()


async def test_topics_create_applies_the_configured_retention_to_an_existing_topic(system: System) -> None:
    from services.kafka_topics import ensure_topics

    settings = system.settings
    assert await _retention_ms(settings) == str(settings.conversation_retention_ms)
    week = settings.model_copy(update={"conversation_retention_ms": 7 * 24 * 3600 * 1000})
    try:
        assert await ensure_topics(week) == []
        await eventually(
            lambda: _retention_ms(settings),
            lambda v: v == str(7 * 24 * 3600 * 1000),
            what="retention applied",
        )
    finally:
        await ensure_topics(settings)
    assert await _retention_ms(settings) == str(settings.conversation_retention_ms)


async def test_verify_reports_offsets_gone_from_kafka_before_they_were_archived(system: System) -> None:
    from aiokafka.admin.records_to_delete import RecordsToDelete

    settings = system.settings
    topic = f"archive-lost-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(50):
            await producer.send(topic, value=f"v{i}".encode(), partition=0)
        await producer.flush()
    finally:
        await producer.stop()
    env = {**os.environ, **system.env}
    intact = await run_cli(env, "archive", "verify", "--topic", topic)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    # Retention (here: delete_records) drops offsets 0..19 before any archiver saw them.
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records(
            {TopicPartition(topic, 0): RecordsToDelete(before_offset=20)}, timeout_ms=30_000
        )
    finally:
        await admin.close()
    lost = await run_cli(env, "archive", "verify", "--topic", topic)
    assert lost.returncode == 1
    assert "offsets 0..19 are gone from Kafka and not archived" in lost.stdout


@pytest.mark.timeout(300)
async def test_restore_takes_what_the_log_has_and_refuses_what_would_harm(system: System) -> None:
    """Seen in the twenty-ninth session's trial: the README's own `restore --partition 2
    --from-offset 0 --to-offset 999` ended in a traceback claiming the log "starts at 1000" (the
    range ran past the log's end, and offsets still in Kafka were never read); a partition that
    does not exist did too; `--into-topic` of the live log was accepted (the assistant answered
    the restored messages again); a missing target topic failed after 44 s."""
    settings = system.settings
    env = {**os.environ, **system.env}
    topic = f"restore-{uuid.uuid4().hex[:8]}"
    await create_topic(settings, topic, 2)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"k", partition=1)
    finally:
        await producer.stop()

    # Past the end: what there is (from Kafka: nothing of it is archived), and a note saying so.
    done = await run_cli(
        env,
        "archive",
        "restore",
        "--topic",
        topic,
        "--partition",
        "1",
        "--from-offset",
        "0",
        "--to-offset",
        "999",
    )
    assert done.returncode == 0, done.stderr
    assert [bytes.fromhex(json.loads(x)["value_hex"]) for x in done.stdout.splitlines()] == [
        f"v{i}".encode() for i in range(5)
    ]
    assert "ends at offset 4" in done.stderr, done.stderr

    def span(partition: int, first: int, last: int, *more: str) -> list[str]:
        return ["--partition", str(partition), "--from-offset", str(first), "--to-offset", str(last), *more]

    refusals = {
        "no such partition": (span(9, 0, 3), "no partition 9"),
        "past the end": (span(1, 7, 9), "past it"),
        "negative": (span(1, -5, 3), "negative"),
        "into the live log": (span(1, 0, 3, "--into-topic", settings.conversation_topic), "live event log"),
        "into a missing topic": (span(1, 0, 3, "--into-topic", f"{topic}-nowhere"), "create it first"),
    }
    for what, (args, says) in refusals.items():
        refused = await run_cli(env, "archive", "restore", "--topic", topic, *args)
        assert refused.returncode == 1, (what, refused)
        assert "Traceback" not in refused.stderr, (what, refused.stderr)
        assert says in refused.stderr, (what, refused.stderr)
