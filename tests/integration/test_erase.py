"""`switchboard tenant erase` on the real stack: after it, nothing of the customer remains in
ClickHouse (every table), in Redis (every key, every value) or in S3 (every object, decompressed,
every record decoded); the tenant's other customers are untouched; events of the customer still
in Kafka stay out of the live processors and of a replay; the archive still verifies."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import zstandard
from aiokafka import AIOKafkaProducer
from switchboard.v1 import events_pb2

from schemas.events import (
    Event,
    EventDecodeError,
    decode_event,
    encode_event,
    event_headers,
    event_key,
    new_event,
)
from services.settings import Settings
from streams.archive import ArchiveStore, verify_archive
from streams.archive._segment import MAGIC, decode_records
from streams.replay import ReplayOptions, clickhouse_client, kafka_offsets, replay
from streams.replay._sessions import redis_for
from streams.replay.workload import mixed_workload
from streams.sessions._state import DIGEST_BYTES, message_digest
from tests.conftest import System, eventually
from tests.integration.test_replay import projector_caught_up, sessions_caught_up

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def produce(settings: Settings, events: list[Event], timestamp_ms: int | None = None) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for event in events:
            await producer.send(
                settings.conversation_topic,
                key=event_key(event),
                value=encode_event(event),
                headers=event_headers(event),
                timestamp_ms=timestamp_ms,
            )
        await producer.flush()
    finally:
        await producer.stop()


def workload(tenant: str, victim: str, marker: str) -> tuple[list[Event], set[str], set[str]]:
    """A mixed workload (every event type) where two conversations belong to `victim`, each with
    a message carrying `marker`; (events, victim conversation ids, victim event ids)."""
    events = mixed_workload(tenant, 16, seed=7)
    starts = [e for e in events if e.WhichOneof("payload") == "conversation_started"]
    victims = {starts[0].conversation_id, starts[5].conversation_id}
    out: list[Event] = []
    for e in events:
        if e.WhichOneof("payload") == "conversation_started" and e.conversation_id in victims:
            e.conversation_started.customer_id = victim
            out.append(e)
            out.append(
                new_event(
                    tenant,
                    e.conversation_id,
                    message_received=events_pb2.MessageReceived(
                        client_message_id="secret",
                        text=f"note for the agent: {marker}",
                        sender=events_pb2.SENDER_CUSTOMER,
                    ),
                )
            )
            continue
        if e.WhichOneof("payload") == "conversation_started":
            assert e.conversation_started.customer_id != victim
        out.append(e)
    return out, victims, {e.event_id for e in out if e.conversation_id in victims}


# --- where anything of the customer could be ---------------------------------------------------


def clickhouse_traces(settings: Settings, needles: list[str], tenant: str | None = None) -> list[str]:
    """Every table and view of every database but the system ones (the live one and the replay's
    scratch copy), whole, searched for the needles (and, with `tenant`, any row of that tenant)."""
    client = clickhouse_client(settings)
    found: list[str] = []
    try:
        objects = client.query(
            "SELECT database, name FROM system.tables WHERE database NOT IN "
            "('system', 'information_schema', 'INFORMATION_SCHEMA') "
            "AND name != 'schema_migrations' AND engine != 'MaterializedView'"
        ).result_rows
        for database, name in objects:
            body = client.raw_query(f"SELECT * FROM `{database}`.`{name}` FORMAT TabSeparated")
            text = body.decode("utf-8", errors="replace")
            found += [f"ClickHouse {database}.{name}: {n}" for n in needles if n in text]
            if tenant is not None:
                columns = {
                    r[0]
                    for r in client.query(
                        "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String}",
                        parameters={"d": database, "t": name},
                    ).result_rows
                }
                if "tenant_id" in columns:
                    rows = client.query(
                        f"SELECT count() FROM `{database}`.`{name}` WHERE tenant_id = {{t:String}}",
                        parameters={"t": tenant},
                    ).result_rows[0][0]
                    if rows:
                        found.append(f"ClickHouse {database}.{name}: {rows} rows of tenant {tenant}")
    finally:
        client.close()
    return found


async def redis_traces(redis: Any, needles: list[str]) -> list[str]:
    """Every key of the database, its name and its whole value."""
    found: list[str] = []
    raw = [n.encode() for n in needles]
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            parts = [await redis.get(key) or b""]
        elif kind == "hash":
            parts = [b for kv in (await redis.hgetall(key)).items() for b in kv]
        elif kind == "stream":
            parts = [b for _, fields in await redis.xrange(key) for kv in fields.items() for b in kv]
        elif kind == "zset":
            parts = list(await redis.zrange(key, 0, -1))
        elif kind == "set":
            parts = list(await redis.smembers(key))
        elif kind == "list":
            parts = list(await redis.lrange(key, 0, -1))
        else:
            parts = []
        blob = b"\x00".join(p if isinstance(p, bytes) else str(p).encode() for p in [key, *parts])
        found += [f"Redis {key!r}: {n.decode()}" for n in raw if n in blob]
    return found


def s3_traces(settings: Settings, needles: list[str], tenant: str | None = None) -> tuple[list[str], int]:
    """Every object of the bucket (segments decompressed and every record decoded); (traces,
    records decoded)."""
    store = ArchiveStore(settings)
    raw = [n.encode() for n in needles]
    found: list[str] = []
    decoded = 0
    for name in store.names(""):
        body = store.get(name)
        if name.endswith(".zst"):
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
            if body.startswith(MAGIC):
                for record in decode_records(body, "t", 0):
                    try:
                        event = decode_event(record.value)
                    except EventDecodeError:
                        continue
                    decoded += 1
                    text = str(event)
                    found += [f"S3 {name} offset {record.offset}: {n}" for n in needles if n in text]
                    if tenant is not None and event.tenant_id == tenant:
                        found.append(f"S3 {name} offset {record.offset}: event of tenant {tenant}")
        found += [f"S3 {name}: {n.decode()}" for n in raw if n in body]
    return found, decoded


async def aof_traces(settings: Settings, needles: list[str]) -> list[str]:
    """Redis's append-only files on disk (every past write until the file is rewritten)."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        directory = Path(str((await redis.config_get("dir"))["dir"]))
        directory /= str((await redis.config_get("appenddirname"))["appenddirname"])
    finally:
        await redis.aclose()
    found: list[str] = []
    for path in sorted(directory.iterdir()):
        body = path.read_bytes()
        found += [f"AOF {path.name}: {n}" for n in needles if n.encode() in body]
    return found


async def everywhere(settings: Settings, needles: list[str], tenant: str | None = None) -> list[str]:
    """ClickHouse, every Redis database (the live hot view and the replay's scratch one), S3."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    in_redis: list[str] = []
    try:
        for db in (await redis.info("keyspace")).keys():
            other = redis_for(settings, int(str(db).removeprefix("db")))
            try:
                in_redis += [f"db {db}: {t}" for t in await redis_traces(other, needles)]
            finally:
                await other.aclose()
    finally:
        await redis.aclose()
    in_clickhouse = await asyncio.to_thread(clickhouse_traces, settings, needles, tenant)
    in_s3, _ = await asyncio.to_thread(s3_traces, settings, needles, tenant)
    return in_clickhouse + in_redis + in_s3


async def archived_up_to_log_end(settings: Settings) -> None:
    _, ends = await kafka_offsets(settings, settings.conversation_topic)
    store = ArchiveStore(settings)
    await eventually(
        lambda: asyncio.gather(
            *(asyncio.to_thread(store.next_offset, settings.conversation_topic, p) for p in ends)
        ),
        lambda got: all((n or 0) >= ends[p] for p, n in zip(ends, got, strict=True)),
        within_s=120,
        what="the archiver reaching the log end",
    )


async def switchboard(system: System, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / ".venv" / "bin" / "switchboard"),
        *args,
        env={**os.environ, **system.env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def clickhouse_count(settings: Settings, sql: str, **params: str) -> int:
    client = clickhouse_client(settings)
    try:
        return int(client.query(sql, parameters=params).result_rows[0][0])
    finally:
        client.close()


async def caught_up(settings: Settings) -> None:
    await projector_caught_up(settings)
    await sessions_caught_up(settings)
    await archived_up_to_log_end(settings)


@pytest.mark.timeout(600)
async def test_erasing_a_customer_leaves_nothing_of_them_and_spares_the_others(system: System) -> None:
    settings = system.settings
    tenant = f"er{uuid.uuid4().hex[:8]}"
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    marker = f"secret{uuid.uuid4().hex[:10]}"
    events, victims, victim_events = workload(tenant, victim, marker)
    others = [e for e in events if e.conversation_id not in victims]
    await produce(settings, events)
    await caught_up(settings)

    # Replays compared without swapping leave their rebuilds in the scratch database and the
    # scratch Redis db: copies of the customer an erasure must find too.
    (check,) = await replay(settings, ReplayOptions(target="projections", swap=False))
    assert check.identical, check.differences
    (check,) = await replay(settings, ReplayOptions(target="sessions", swap=False))
    assert check.identical, check.differences

    per_minute = "SELECT sum(events) FROM switchboard.events_per_minute WHERE tenant_id = {t:String}"
    assert await asyncio.to_thread(clickhouse_count, settings, per_minute, t=tenant) == len(events)

    needles = [victim, marker, *sorted(victims), *sorted(victim_events)]
    before = await everywhere(settings, needles)
    # The test can fail: the customer is everywhere before the erasure.
    for where in (
        f"ClickHouse switchboard.raw_messages: {marker}",
        f"ClickHouse {settings.replay_database}.raw_messages: {marker}",
        f"ClickHouse switchboard.conversation_facts: {victim}",
    ):
        assert where in before, before
    redis_dbs = {t.split(":")[0] for t in before if t.startswith("db ")}
    assert redis_dbs == {"db db0", f"db db{settings.replay_redis_db}"}, redis_dbs
    assert any(t.startswith("S3") for t in before), before
    assert await aof_traces(settings, [marker])

    code, out, err = await switchboard(
        system, "tenant", "erase", tenant, "--customer", victim, "--requested-by", "test"
    )
    assert code == 0, f"{out}\n{err[-4000:]}"
    assert "conversations: 2" in out, out

    assert await everywhere(settings, needles) == []
    # Not on Redis's disk either: the append-only file was rewritten.
    assert await aof_traces(settings, needles) == []

    # The erasure is an event: on the privacy topic, with the conversations it erased.
    from streams.privacy.erasures import load_erasures

    registry = await load_erasures(settings)
    assert registry.conversations[tenant] == victims

    # The other customers of the tenant are untouched, in every store.
    assert await asyncio.to_thread(
        clickhouse_count,
        settings,
        "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}",
        t=tenant,
    ) == len(others)
    # The per-minute counts (sets of event ids) were rebuilt without the customer's events.
    assert await asyncio.to_thread(clickhouse_count, settings, per_minute, t=tenant) == len(others)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        for cid in {e.conversation_id for e in others}:
            assert await redis.hget(f"sb:{{{tenant}:{cid}}}:conv", "state"), cid
    finally:
        await redis.aclose()
    archived_ids: set[str] = set()
    store = ArchiveStore(settings)
    for p in store.partitions(settings.conversation_topic):
        for manifest in store.listing(settings.conversation_topic, p).manifests:
            for record in store.read_segment(manifest):
                if dict(record.headers).get("sb-tenant") == tenant.encode():
                    archived_ids.add(decode_event(record.value).event_id)
    assert {e.event_id for e in others} <= archived_ids
    # The rewritten archive verifies: checksums, counts, order, no gap, no overlap.
    reports = await asyncio.to_thread(verify_archive, store, settings.conversation_topic)
    assert all(r.ok for r in reports), [r.problems for r in reports]

    # An event of an erased conversation still arriving (an assistant reply in flight, a lagging
    # producer) stays out of every view and of the archive.
    late_cid = sorted(victims)[0]
    late = new_event(
        tenant,
        late_cid,
        reply_generated=events_pb2.ReplyGenerated(text=f"late answer {marker}", message_event_id="x"),
    )
    witness = new_event(
        tenant,
        f"witness-{uuid.uuid4().hex[:6]}",
        conversation_started=events_pb2.ConversationStarted(customer_id="someone-else"),
    )
    await produce(settings, [late, witness])
    await caught_up(settings)
    assert (
        await asyncio.to_thread(
            clickhouse_count,
            settings,
            "SELECT count() FROM switchboard.events WHERE event_id = {e:String}",
            e=witness.event_id,
        )
        == 1
    )
    assert await everywhere(settings, [*needles, late.event_id]) == []

    # A replay from the log (Kafka still holds every original record) does not bring them back.
    (projections,) = await replay(settings, ReplayOptions(target="projections"))
    assert projections.swapped
    (sessions,) = await replay(settings, ReplayOptions(target="sessions", swap=False))
    assert sessions.identical, sessions.differences
    scratch = redis_for(settings, settings.replay_redis_db)
    try:
        assert await redis_traces(scratch, needles) == []
    finally:
        await scratch.aclose()
    assert await asyncio.to_thread(clickhouse_traces, settings, needles) == []
    assert (
        await asyncio.to_thread(
            clickhouse_count,
            settings,
            "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}",
            t=tenant,
        )
        == len(others) + 1
    )


@pytest.mark.timeout(600)
async def test_erasing_a_whole_tenant_leaves_nothing_of_it(system: System) -> None:
    settings = system.settings
    tenant = f"ew{uuid.uuid4().hex[:8]}"
    bystander = f"eb{uuid.uuid4().hex[:8]}"
    events = mixed_workload(tenant, 6, seed=3)
    kept = mixed_workload(bystander, 4, seed=4)
    await produce(settings, events + kept)
    # The tenant's knowledge base: a document, indexed by the assistant into the hot view.
    from switchboard.v1 import knowledge_pb2

    from schemas.events import HEADER_TENANT, HEADER_TYPE
    from services.ingress._knowledge import record_key, upserted
    from streams.privacy._erase import tenant_documents

    document = upserted(
        tenant, knowledge_pb2.Document(document_id="faq/1", title="退货", body=f"return policy of {tenant}")
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.knowledge_topic,
            document.SerializeToString(),
            key=record_key(tenant, "faq/1"),
            headers=[(HEADER_TYPE, b"document_upserted"), (HEADER_TENANT, tenant.encode())],
        )
    finally:
        await producer.stop()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        await eventually(
            lambda: redis.hkeys(f"sb:{{{tenant}}}:documents"),
            lambda keys: keys == [b"faq/1"],
            what="the assistant indexing the tenant's document",
        )
    finally:
        await redis.aclose()
    await caught_up(settings)
    assert await everywhere(settings, [tenant])

    code, out, err = await switchboard(system, "tenant", "erase", tenant)
    assert code == 0, f"{out}\n{err[-4000:]}"
    assert "knowledge documents deleted: 1" in out, out
    # The knowledge topic now ends the document with a deletion (compaction drops its text).
    assert await tenant_documents(settings, tenant) == []
    assert await everywhere(settings, [tenant], tenant=tenant) == []
    assert await asyncio.to_thread(
        clickhouse_count,
        settings,
        "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}",
        t=bystander,
    ) == len(kept)
    # Re-projecting the tenant's part of the log (still in Kafka) projects nothing of it.
    await replay(settings, ReplayOptions(target="projections", tenant=tenant))
    assert await asyncio.to_thread(clickhouse_traces, settings, [tenant], tenant) == []

    # A conversation of the tenant goes on after the erasure: its new events are kept, and
    # nothing from before comes back with them (the sessions worker held its state in memory).
    ongoing = events[0].conversation_id
    after = new_event(
        tenant,
        ongoing,
        message_received=events_pb2.MessageReceived(
            client_message_id="after", text="still there?", sender=events_pb2.SENDER_CUSTOMER
        ),
    )
    await produce(settings, [after])
    await caught_up(settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        state = await redis.hget(f"sb:{{{tenant}:{ongoing}}}:conv", "state")
    finally:
        await redis.aclose()
    # Folded: its client id is in the state's dedup window (not necessarily the last event: the
    # assistant may still answer it, if the erased knowledge base had not left it yet).
    assert state is not None
    window = base64.b64decode(json.loads(state)["recent_message_digests"])
    assert message_digest("after") in [
        window[i : i + DIGEST_BYTES] for i in range(0, len(window), DIGEST_BYTES)
    ]
    assert await everywhere(settings, sorted({e.event_id for e in events})) == []


@pytest.mark.timeout(600)
async def test_retention_deletes_what_is_older_than_the_tenants_days(system: System) -> None:
    settings = system.settings
    tenant = f"rt{uuid.uuid4().hex[:8]}"
    three_days_ago = time.time() - 3 * 86400
    old = mixed_workload(tenant, 3, seed=5)
    for e in old:
        e.occurred_at.FromNanoseconds(int(three_days_ago * 1e9))
    recent = mixed_workload(tenant, 2, seed=6)
    await produce(settings, old, timestamp_ms=int(three_days_ago * 1000))
    await produce(settings, recent)
    await caught_up(settings)
    count_sql = "SELECT count() FROM switchboard.events WHERE tenant_id = {t:String}"
    assert await asyncio.to_thread(clickhouse_count, settings, count_sql, t=tenant) == len(old) + len(recent)

    assert (await switchboard(system, "tenants", "create", tenant))[0] == 0
    code, out, err = await switchboard(system, "tenants", "update", tenant, "--retention-days", "1")
    assert code == 0 and "retention: 1 days" in out, (out, err)
    code, out, err = await switchboard(system, "tenant", "retention", "--tenant", tenant)
    assert code == 0, f"{out}\n{err[-4000:]}"

    assert await asyncio.to_thread(clickhouse_count, settings, count_sql, t=tenant) == len(recent)
    conversations = await asyncio.to_thread(
        clickhouse_count,
        settings,
        "SELECT count() FROM switchboard.conversations WHERE tenant_id = {t:String}",
        t=tenant,
    )
    assert conversations == len({e.conversation_id for e in recent}), out
    store = ArchiveStore(settings)
    archived: set[str] = set()
    for p in store.partitions(settings.conversation_topic):
        for manifest in store.listing(settings.conversation_topic, p).manifests:
            for record in store.read_segment(manifest):
                if dict(record.headers).get("sb-tenant") == tenant.encode():
                    archived.add(decode_event(record.value).event_id)
    assert archived == {e.event_id for e in recent}
    reports = await asyncio.to_thread(verify_archive, store, settings.conversation_topic)
    assert all(r.ok for r in reports), [r.problems for r in reports]

    # A replay from Kafka (which still holds the old events) does not bring them back: the
    # rebuild equals the live tables, and holds only the recent events of the tenant.
    (check,) = await replay(settings, ReplayOptions(target="projections", swap=False))
    assert check.identical, check.differences
    rebuilt_sql = f"SELECT count() FROM {settings.replay_database}.events WHERE tenant_id = {{t:String}}"
    assert await asyncio.to_thread(clickhouse_count, settings, rebuilt_sql, t=tenant) == len(recent)

    # The periodic job (run by the archiver every SWITCHBOARD_RETENTION_INTERVAL_S) does the same.
    from streams.privacy._retention import retention_loop

    older = mixed_workload(tenant, 2, seed=8)
    for e in older:
        e.occurred_at.FromNanoseconds(int(three_days_ago * 1e9))
    await produce(settings, older, timestamp_ms=int(three_days_ago * 1000))
    await caught_up(settings)
    assert await asyncio.to_thread(clickhouse_count, settings, count_sql, t=tenant) == len(older) + len(
        recent
    )
    job = asyncio.ensure_future(retention_loop(settings, 0.5))
    try:
        await eventually(
            lambda: asyncio.to_thread(clickhouse_count, settings, count_sql, t=tenant),
            lambda n: n == len(recent),
            what="the retention job deleting the old events",
        )
    finally:
        job.cancel()


class CrashingStore(ArchiveStore):
    """Dies (raises) at one step of a segment rewrite: the new segment's PUT done, then the
    manifest's PUT (`at="manifest"`) or the old segment's DELETE (`at="delete"`)."""

    def __init__(self, settings: Settings, at: str) -> None:
        super().__init__(settings)
        self.at = at

    def put(self, name: str, data: bytes, content_type: str) -> None:
        if self.at == "manifest" and name.endswith(".manifest.json"):
            raise RuntimeError("killed before the manifest switch")
        super().put(name, data, content_type)

    def remove(self, name: str) -> None:
        if self.at == "delete":
            raise RuntimeError("killed before the old segment's delete")
        super().remove(name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash_at", ["manifest", "delete"])
async def test_a_segment_rewrite_killed_midway_leaves_a_valid_archive_and_finishes_when_run_again(
    local_stack: Settings, crash_at: str
) -> None:
    from streams.archive._segment import build_segment, partition_prefix
    from streams.privacy._archive import rewrite_partition
    from streams.privacy._erase import drop_of, erasure_event
    from streams.privacy.erasures import Erasures

    settings = local_stack
    topic = f"erase-crash-{uuid.uuid4().hex[:8]}"
    store = ArchiveStore(settings)
    await asyncio.to_thread(store.ensure_bucket)
    tenant, victim = "acme", f"c-victim-{uuid.uuid4().hex[:6]}"
    events = [
        new_event(
            tenant,
            victim if i % 3 == 0 else f"c-other-{i}",
            message_received=events_pb2.MessageReceived(text=f"m{i}"),
        )
        for i in range(12)
    ]
    from streams._consumer import Record

    records = [
        Record(topic, 0, i, event_key(e), encode_event(e), 1_000 + i, tuple(event_headers(e)))
        for i, e in enumerate(events)
    ]
    for first in (0, 6):
        stored, manifest = build_segment(store.prefix, topic, 0, first, first + 5, records[first : first + 6])
        await asyncio.to_thread(store.write_segment, stored, manifest)
    erasures = Erasures()
    erasures.apply(erasure_event(tenant, "bob", [victim], "test", 0))

    def objects() -> list[str]:
        return sorted(store.names(partition_prefix(store.prefix, topic, 0)))

    def victim_records() -> int:
        found = 0
        for name in objects():
            if name.endswith(".seg.zst"):
                raw = zstandard.ZstdDecompressor().decompress(store.get(name), max_output_size=1 << 24)
                found += sum(1 for r in decode_records(raw, topic, 0) if r.key == victim.encode())
        return found

    with pytest.raises(RuntimeError, match="killed"):
        await asyncio.to_thread(
            rewrite_partition, CrashingStore(settings, crash_at), topic, 0, drop_of(erasures)
        )
    # Killed midway: the archive a reader sees is whole and verifies; an extra object lies around.
    reports = await asyncio.to_thread(verify_archive, store, topic)
    assert all(r.ok for r in reports) and reports[0].records == 12 - (0 if crash_at == "manifest" else 2)
    assert len(objects()) == 5
    assert victim_records() > 0

    stats = await asyncio.to_thread(rewrite_partition, store, topic, 0, drop_of(erasures))
    assert stats.leftovers_deleted == 1
    listing = store.listing(topic, 0)
    assert objects() == sorted(
        [m.segment for m in listing.manifests] + [n for n in objects() if n.endswith(".manifest.json")]
    )
    assert len(objects()) == 4 and victim_records() == 0
    reports = await asyncio.to_thread(verify_archive, store, topic)
    assert all(r.ok for r in reports) and reports[0].records == 8
    assert (reports[0].first_offset, reports[0].last_offset) == (0, 11)
