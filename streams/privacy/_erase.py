"""`switchboard tenant erase TENANT [--customer ID]`: a data-subject erasure.

Order (each step idempotent, so running the command again finishes an interrupted erasure):

1. find the customer's conversations: every `ConversationStarted` with that customer id in the
   log (the S3 archive and Kafka), in ClickHouse (`conversation_facts`) and in the hot view;
2. record the erasure: a `CustomerErased` event on the privacy topic (acks=all). From here on
   every processor and replay skips those conversations' events (streams/privacy/erasures.py);
3. purge: ClickHouse (`ALTER TABLE … DELETE`, synchronous, on every storage table, and the
   per-minute event counts of the minutes they touched rebuilt from what is left), Redis (every
   key of those conversations, their places in the tenant's queues and open set), the archive
   (segments rewritten without their records, see streams/privacy/_archive.py);
4. wait until the live projector and sessions worker have passed the log end as of the
   erasure (a batch they took before they learned of it may still write), then purge again.

A whole-tenant erasure (no customer) erases every event of the tenant that occurred before the
erasure and every key and row of the tenant.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import events_pb2

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from schemas import hotview as hv
from schemas.events import HEADER_TENANT, Event, EventDecodeError, decode_event, new_event
from services.analytics import DATABASE
from services.settings import Settings
from streams._consumer import Record
from streams.archive import ArchiveStore
from streams.privacy._archive import RewriteStats, rewrite_archive
from streams.privacy.erasures import FOLLOW_BOUND_S, Erasures, publish_erasure

# The live processors whose writes an erasure must outrun (their Kafka consumer groups).
LIVE_GROUPS = ("switchboard-projector", "switchboard-sessions")
# The conversation id of a whole-tenant erasure's envelope (an event needs one).
TENANT_ERASURE = "*"


class EraseError(RuntimeError):
    """The erasure cannot be done as asked; the message says why."""


@dataclass(slots=True)
class EraseReport:
    tenant: str
    customer: str | None
    event_id: str = ""
    conversations: list[str] = field(default_factory=list)
    clickhouse_rows: dict[str, int] = field(default_factory=dict)
    redis_keys: int = 0
    documents: int = 0
    archive: RewriteStats = field(default_factory=RewriteStats)
    notes: list[str] = field(default_factory=list)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def erasure_event(
    tenant: str, customer: str | None, conversations: list[str], requested_by: str, now_ns: int
) -> Event:
    """The `CustomerErased` event of an erasure. Pure (the clock is an argument)."""
    payload = events_pb2.CustomerErased(
        customer_id=customer or "",
        requested_by=requested_by,
        conversation_ids=sorted(conversations),
        whole_tenant=customer is None,
    )
    if customer is None:
        payload.erased_before.CopyFrom(
            Timestamp(seconds=now_ns // 1_000_000_000, nanos=now_ns % 1_000_000_000)
        )
    return new_event(
        tenant, TENANT_ERASURE if customer is None else f"erasure:{customer}", customer_erased=payload
    )


def drop_of(erasures: Erasures) -> Callable[[Record], bool]:
    """Whether an archived record is erased (decoded only for tenants with an erasure)."""

    def drop(record: Record) -> bool:
        return not erasures.keeps(record)

    return drop


# --- 1. finding the customer's conversations ---------------------------------------------------


def _started_by(record: Record, tenant: str, customer: str) -> str | None:
    header = next((v for k, v in record.headers if k == HEADER_TENANT), None)
    if header is not None and header != tenant.encode():
        return None
    try:
        event = decode_event(record.value)
    except EventDecodeError:
        return None
    if (
        event.tenant_id == tenant
        and event.WhichOneof("payload") == "conversation_started"
        and event.conversation_started.customer_id == customer
    ):
        return event.conversation_id
    return None


def conversations_in_archive(store: ArchiveStore, topic: str, tenant: str, customer: str) -> set[str]:
    found: set[str] = set()
    for p in store.partitions(topic):
        for manifest in store.listing(topic, p).manifests:
            for record in store.read_segment(manifest):
                if (conversation := _started_by(record, tenant, customer)) is not None:
                    found.add(conversation)
    return found


async def tenant_documents(settings: Settings, tenant: str) -> list[str]:
    """The tenant's knowledge documents that are not deleted, from the (compacted) knowledge topic."""
    from switchboard.v1 import knowledge_pb2

    present: dict[str, bool] = {}

    def fold(record: Record) -> None:
        header = next((v for k, v in record.headers if k == HEADER_TENANT), None)
        if header is not None and header != tenant.encode():
            return
        event = knowledge_pb2.KnowledgeEvent()
        try:
            event.ParseFromString(record.value or b"")
        except Exception:  # not a knowledge event: nothing of the tenant's documents
            return
        if event.tenant_id != tenant:
            return
        if event.WhichOneof("payload") == "document_upserted":
            present[event.document_upserted.document_id] = True
        elif event.WhichOneof("payload") == "document_deleted":
            present[event.document_deleted] = False

    await read_topic(settings, settings.knowledge_topic, fold)
    return sorted(d for d, alive in present.items() if alive)


async def delete_documents(settings: Settings, tenant: str, documents: list[str]) -> None:
    """A deletion for each document, keyed like its upsert: compaction then drops the upsert's
    text from the knowledge topic, and every assistant removes it from its index and Redis."""
    from aiokafka import AIOKafkaProducer

    from schemas.events import HEADER_TYPE
    from services.ingress._knowledge import deleted, record_key

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for document in documents:
            await producer.send_and_wait(
                settings.knowledge_topic,
                deleted(tenant, document).SerializeToString(),
                key=record_key(tenant, document),
                headers=[(HEADER_TYPE, b"document_deleted"), (HEADER_TENANT, tenant.encode())],
            )
    finally:
        await producer.stop()


async def conversations_in_kafka(settings: Settings, tenant: str, customer: str) -> set[str]:
    found: set[str] = set()

    def fold(record: Record) -> None:
        if (conversation := _started_by(record, tenant, customer)) is not None:
            found.add(conversation)

    await read_topic(settings, settings.conversation_topic, fold)
    return found


async def read_topic(settings: Settings, topic: str, fold: Callable[[Record], None]) -> None:
    """Every record Kafka holds of `topic`, from each partition's start to its end as of now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        client_id="switchboard-erase-scan",
    )
    await consumer.start()
    try:
        from streams.replay._source import kafka_offsets

        _, end_of = await kafka_offsets(settings, topic)
        partitions = [TopicPartition(topic, p) for p in sorted(end_of)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = {TopicPartition(topic, p): e for p, e in end_of.items()}
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for tp, msgs in (await consumer.getmany(timeout_ms=500, max_records=5000)).items():
                for m in msgs:
                    if m.offset >= ends[tp]:
                        continue
                    record = Record(
                        topic,
                        tp.partition,
                        m.offset,
                        m.key,
                        m.value,
                        m.timestamp,
                        tuple((k, v or b"") for k, v in (m.headers or ())),
                    )
                    fold(record)
    finally:
        await consumer.stop()


def conversations_in_clickhouse(client: Any, tenant: str, customer: str) -> set[str]:
    rows = client.query(
        f"SELECT DISTINCT conversation_id FROM {DATABASE}.conversation_facts "
        f"WHERE tenant_id = {quote(tenant)} AND customer_id = {quote(customer)}"
    ).result_rows
    return {str(r[0]) for r in rows}


def _glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


async def conversations_in_redis(redis: aioredis.Redis, tenant: str, customer: str) -> set[str]:
    found: set[str] = set()
    prefix = f"sb:{{{tenant}:"
    async for key in redis.scan_iter(match=f"{_glob(prefix)}*:conv", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        owner = await redis.hget(name, hv.F_CUSTOMER)
        if owner is not None and (owner.decode() if isinstance(owner, bytes) else str(owner)) == customer:
            found.add(name[len(prefix) : -len("}:conv")])
    return found


# --- 3. purging ----------------------------------------------------------------------------------


def database_exists(client: Any, database: str) -> bool:
    rows = client.query(
        "SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": database}
    ).result_rows
    return bool(rows[0][0])


def table_columns(client: Any, database: str, table: str) -> set[str]:
    return {
        str(r[0])
        for r in client.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
            parameters={"db": database, "t": table},
        ).result_rows
    }


def purge_clickhouse(
    client: Any, tenant: str, conversations: list[str] | None, database: str = DATABASE
) -> dict[str, int]:
    """Delete the tenant's rows (of `conversations`, or all) from every storage table; returns
    the rows each table held before. Synchronous mutations: done when this returns. Also run on
    the replay's scratch database, which keeps a rebuild (`--no-swap`) or the previous tables."""
    from streams.replay._projections import storage_tables

    where_tenant = f"tenant_id = {quote(tenant)}"
    where = where_tenant
    if conversations is not None:
        if not conversations:
            return {}
        where += f" AND conversation_id IN ({', '.join(quote(c) for c in conversations)})"
    sync = {"mutations_sync": 2}
    deleted: dict[str, int] = {}
    minutes: list[Any] = []
    tables = storage_tables(client, database)
    if conversations is not None and "raw_events" in tables and "event_counts" in tables:
        # The per-minute event counts hold sets of event ids per (tenant, minute, type): rebuilt
        # below for the minutes these conversations touched, from the rows that remain.
        minutes = [
            r[0]
            for r in client.query(
                f"SELECT DISTINCT toStartOfMinute(occurred_at) FROM `{database}`.raw_events WHERE {where}"
            ).result_rows
        ]
    for table in sorted(tables):
        columns = table_columns(client, database, table)
        if "tenant_id" not in columns:
            continue
        if conversations is not None and "conversation_id" not in columns:
            continue
        condition = where if conversations is not None else where_tenant
        held = int(
            client.query(f"SELECT count() FROM `{database}`.`{table}` WHERE {condition}").result_rows[0][0]
        )
        if held:
            client.command(f"ALTER TABLE `{database}`.`{table}` DELETE WHERE {condition}", settings=sync)
            deleted[table] = held
    if minutes:
        listed = ", ".join(f"toDateTime({quote(m.strftime('%Y-%m-%d %H:%M:%S'))}, 'UTC')" for m in minutes)
        in_minutes = f"{where_tenant} AND minute IN ({listed})"
        client.command(f"ALTER TABLE `{database}`.event_counts DELETE WHERE {in_minutes}", settings=sync)
        client.command(
            f"INSERT INTO `{database}`.event_counts (tenant_id, minute, type, event_ids) "
            "SELECT tenant_id, toStartOfMinute(occurred_at) AS minute, type, uniqExactState(event_id) "
            f"FROM `{database}`.raw_events WHERE {where_tenant} AND toStartOfMinute(occurred_at) IN ({listed}) "
            "GROUP BY tenant_id, minute, type"
        )
        deleted["event_counts (minutes rebuilt)"] = len(minutes)
    return deleted


async def purge_redis(redis: aioredis.Redis, tenant: str, conversations: list[str] | None) -> int:
    """Delete the hot view of the conversations (or the whole tenant); returns keys deleted."""
    deleted = 0
    if conversations is None:
        patterns = [f"{_glob(f'sb:{{{tenant}:')}*", f"{_glob(f'sb:{{{tenant}}}:')}*"]
        patterns.append(f"{_glob(f'sb:rl:{{{tenant}}}:')}*")
        for pattern in patterns:
            batch: list[bytes] = []
            async for key in redis.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await redis.delete(*batch)
                    batch = []
            if batch:
                deleted += await redis.delete(*batch)
        # The set of tenants with open conversations (the idle closer's index).
        await redis.srem(hv.ACTIVE_TENANTS_KEY, tenant)
        return deleted
    for conversation in conversations:
        pattern = f"{_glob(f'sb:{{{tenant}:{conversation}}}:')}*"
        keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if keys:
            deleted += await redis.delete(*keys)
    # The tenant-wide indexes that name conversations (agents' queues, the open conversations,
    # the idle-close activity index, and whatever set or hash is added next): every sorted set,
    # set and hash of the tenant loses the conversations as members or fields.
    async for key in redis.scan_iter(match=f"{_glob(f'sb:{{{tenant}}}:')}*", count=1000):
        kind = await redis.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind == "zset":
            await redis.zrem(key, *conversations)
        elif kind == "set":
            await redis.srem(key, *conversations)
        elif kind == "hash":
            await redis.hdel(key, *conversations)
    return deleted


async def compact_redis_files(redis: aioredis.Redis, within_s: float = 120.0) -> bool:
    """With the append-only file on, Redis keeps every past write on disk until the file is
    rewritten: rewrite it (after any rewrite already running, whose snapshot may predate the
    purge) and wait for it. False when it did not finish in time; True also when AOF is off."""
    from redis.exceptions import ResponseError

    if not int((await redis.info("persistence")).get("aof_enabled", 0)):
        return True
    deadline = time.monotonic() + within_s
    requested = False
    while time.monotonic() < deadline:
        info = await redis.info("persistence")
        busy = int(info.get("aof_rewrite_in_progress", 0)) or int(info.get("aof_rewrite_scheduled", 0))
        if not requested and not busy:
            try:
                await redis.bgrewriteaof()
                requested = True
            except ResponseError:  # another rewrite began meanwhile: ask again after it
                pass
        elif requested and not busy:
            return str(info.get("aof_last_bgrewrite_status", "ok")) == "ok"
        await asyncio.sleep(0.1)
    return False


# --- 4. waiting for the live processors ---------------------------------------------------------


async def _group_positions(settings: Settings, group: str, partitions: list[int]) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        topic = settings.conversation_topic
        return {p: int(await consumer.committed(TopicPartition(topic, p)) or 0) for p in partitions}
    finally:
        await consumer.stop()


async def wait_for_live_processors(settings: Settings, within_s: float) -> list[str]:
    """Wait until each running live processor has committed the log end as of now; returns notes
    about those that did not (stopped ones fold the registry before anything when they start)."""
    from streams.replay._sessions import group_members
    from streams.replay._source import kafka_offsets

    # A processor learns of the erasure within FOLLOW_BOUND_S: batches it starts after that skip
    # the erased events, so only records before the log end as of then can still be written.
    await asyncio.sleep(FOLLOW_BOUND_S)
    _, ends = await kafka_offsets(settings, settings.conversation_topic)
    notes: list[str] = []
    deadline = time.monotonic() + within_s
    for group in LIVE_GROUPS:
        if await group_members(settings, group) == 0:
            continue
        while True:
            got = await _group_positions(settings, group, sorted(ends))
            if all(got.get(p, 0) >= e for p, e in ends.items()):
                break
            if time.monotonic() > deadline:
                behind = {p: (got.get(p, 0), e) for p, e in ends.items() if got.get(p, 0) < e}
                notes.append(
                    f"{group} did not reach the log end within {within_s:.0f}s ({behind}): run the "
                    "erasure again once it has caught up"
                )
                break
            await asyncio.sleep(0.2)
    return notes


# --- the whole operation -------------------------------------------------------------------------


async def erase(
    settings: Settings,
    tenant: str,
    customer: str | None,
    requested_by: str = "",
    wait_s: float = 120.0,
    progress: Callable[[str], None] = lambda _: None,
) -> EraseReport:
    from services.auth._model import check_tenant_id
    from services.kafka_topics import ensure_topics
    from streams.replay._projections import clickhouse_client
    from streams.replay._sessions import redis_for

    check_tenant_id(tenant)
    if customer is not None and not customer.strip():
        raise EraseError("--customer needs a customer id")
    report = EraseReport(tenant, customer)
    await ensure_topics(settings)
    store = ArchiveStore(settings)
    await asyncio.to_thread(store.ensure_bucket)
    client = await asyncio.to_thread(clickhouse_client, settings)
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=60)
    scratch = redis_for(settings, settings.replay_redis_db)
    try:
        conversations: list[str] | None = None
        if customer is not None:
            progress("finding the customer's conversations (archive, Kafka, ClickHouse, Redis)")
            found = await asyncio.to_thread(
                conversations_in_archive, store, settings.conversation_topic, tenant, customer
            )
            found |= await conversations_in_kafka(settings, tenant, customer)
            found |= await asyncio.to_thread(conversations_in_clickhouse, client, tenant, customer)
            found |= await conversations_in_redis(redis, tenant, customer)
            conversations = sorted(found)
            report.conversations = conversations
        if customer is None:
            # The tenant's knowledge base goes too (it is folded again by every assistant at start).
            documents = await tenant_documents(settings, tenant)
            await delete_documents(settings, tenant, documents)
            report.documents = len(documents)
        event = erasure_event(tenant, customer, conversations or [], requested_by, time.time_ns())
        await publish_erasure(settings, event)
        report.event_id = event.event_id
        progress(f"erasure recorded ({event.event_id}); purging")
        erasures = Erasures()
        erasures.apply(event)
        databases = [DATABASE]
        if await asyncio.to_thread(database_exists, client, settings.replay_database):
            databases.append(settings.replay_database)
        for attempt in (1, 2):
            for database in databases:
                rows = await asyncio.to_thread(purge_clickhouse, client, tenant, conversations, database)
                for table, n in rows.items():
                    name = table if database == DATABASE else f"{database}.{table}"
                    report.clickhouse_rows[name] = report.clickhouse_rows.get(name, 0) + n
            report.redis_keys += await purge_redis(redis, tenant, conversations)
            # The replay's scratch database keeps the previous hot view (or a --no-swap rebuild).
            report.redis_keys += await purge_redis(scratch, tenant, conversations)
            stats = await asyncio.to_thread(
                rewrite_archive,
                store,
                settings.conversation_topic,
                drop_of(erasures),
                settings.archive_zstd_level,
            )
            report.archive.segments_read += stats.segments_read
            report.archive.segments_rewritten += stats.segments_rewritten
            report.archive.records_removed += stats.records_removed
            report.archive.leftovers_deleted += stats.leftovers_deleted
            if attempt == 1:
                progress("waiting for the live processors to pass the erasure")
                report.notes.extend(await wait_for_live_processors(settings, wait_s))
        # Redis's append-only file (one per server, every db) still holds the deleted keys' past
        # writes: rewrite it.
        if not await compact_redis_files(redis):
            report.notes.append("Redis: the append-only file rewrite did not finish; run BGREWRITEAOF")
        return report
    finally:
        await redis.aclose()
        await scratch.aclose()
        await asyncio.to_thread(client.close)
