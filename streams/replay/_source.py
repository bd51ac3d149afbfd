"""The log as a replay reads it: the S3 archive for what Kafka no longer holds, then Kafka.

`plan_replay` decides, per partition, the offset range to read (up to Kafka's end offsets when the
plan is made) and which archived segments cover the part before Kafka's log start; it fails with
`ReplayGapError` when some offset of the range is in neither. `read_log` yields the records in
batches, each partition in offset order (partitions are independent: a conversation lives in one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from services.settings import Settings
from streams._consumer import Record
from streams.archive import ArchiveStore, Manifest


class ReplayError(RuntimeError):
    """A replay cannot be done as asked; the message says why and what to do."""


class ReplayGapError(ReplayError):
    """Part of the range is neither in Kafka nor in the archive."""


@dataclass(slots=True)
class PartitionPlan:
    partition: int
    start: int  # first offset to read
    end: int  # Kafka's end offset when the plan was made (exclusive)
    kafka_start: int  # Kafka's log start offset
    segments: list[Manifest] = field(default_factory=list)  # archived part, in offset order
    from_time_ms: int | None = None

    @property
    def archive_end(self) -> int:
        """Offsets start..archive_end-1 come from the archive."""
        return max(self.start, min(self.kafka_start, self.end))

    @property
    def offsets(self) -> int:
        return max(0, self.end - self.start)


@dataclass(slots=True)
class ReplayPlan:
    topic: str
    partitions: list[PartitionPlan]

    @property
    def offsets(self) -> int:
        return sum(p.offsets for p in self.partitions)

    @property
    def from_archive(self) -> int:
        return sum(max(0, p.archive_end - p.start) for p in self.partitions)

    @property
    def ends(self) -> dict[int, int]:
        return {p.partition: p.end for p in self.partitions}


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="none",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )


async def kafka_offsets(settings: Settings, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(log start, log end) per partition of `topic`."""
    consumer = _consumer(settings)
    await consumer.start()
    try:
        return await _offsets(consumer, topic)
    finally:
        await consumer.stop()


async def _offsets(consumer: AIOKafkaConsumer, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ReplayError(f"topic {topic!r} does not exist in Kafka")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    return {tp.partition: int(o) for tp, o in starts.items()}, {
        tp.partition: int(o) for tp, o in ends.items()
    }


async def plan_replay(
    settings: Settings,
    store: ArchiveStore | None,
    topic: str,
    *,
    from_offset: int | dict[int, int] | None = None,
    from_time_ms: int | None = None,
    partitions: list[int] | None = None,
) -> ReplayPlan:
    """What to read for a replay from `from_offset` (every partition, or per partition), or from
    the first record at or after `from_time_ms`, or (neither) from the oldest record kept anywhere."""
    consumer = _consumer(settings)
    await consumer.start()
    try:
        starts, ends = await _offsets(consumer, topic)
        by_time: dict[int, int | None] = {}
        if from_time_ms is not None:
            found = await consumer.offsets_for_times({TopicPartition(topic, p): from_time_ms for p in starts})
            by_time = {tp.partition: (None if ot is None else int(ot.offset)) for tp, ot in found.items()}
    finally:
        await consumer.stop()
    plans: list[PartitionPlan] = []
    for p in sorted(starts):
        if partitions is not None and p not in partitions:
            continue
        kafka_start, end = starts[p], ends[p]
        wanted = from_offset.get(p, end) if isinstance(from_offset, dict) else from_offset
        manifests: list[Manifest] = []
        if store is not None and (wanted is None or wanted < kafka_start):
            listing = await asyncio.to_thread(store.listing, topic, p)
            manifests = listing.manifests
        if wanted is not None:
            start = max(0, wanted)
        elif from_time_ms is not None:
            in_kafka = by_time.get(p)
            start = end if in_kafka is None else in_kafka
            if start <= kafka_start:
                # Maybe older matching records are archived: the first segment that reaches t.
                for m in manifests:
                    if m.max_timestamp_ms >= from_time_ms and m.first_offset < kafka_start:
                        start = m.first_offset
                        break
        else:
            start = min(kafka_start, manifests[0].first_offset) if manifests else kafka_start
        start = min(start, end)
        plan = PartitionPlan(p, start, end, kafka_start, from_time_ms=from_time_ms)
        if start < kafka_start and start < end:
            plan.segments = _cover(p, manifests, start, min(kafka_start, end), topic)
        plans.append(plan)
    return ReplayPlan(topic, plans)


def _cover(partition: int, manifests: list[Manifest], start: int, stop: int, topic: str) -> list[Manifest]:
    """The segments holding offsets start..stop-1, or ReplayGapError naming the missing range."""
    chosen: list[Manifest] = []
    position = start
    for m in manifests:
        if m.last_offset < position:
            continue
        if m.first_offset > position:
            break
        chosen.append(m)
        position = m.last_offset + 1
        if position >= stop:
            return chosen
    raise ReplayGapError(
        f"{topic} partition {partition}: offsets {position}..{stop - 1} are no longer in Kafka (its log "
        f"starts at {stop}) and not in the S3 archive; replay from offset {stop} or later, or restore "
        "the missing segments (see `switchboard archive list`)"
    )


async def read_log(
    settings: Settings,
    store: ArchiveStore | None,
    plan: ReplayPlan,
    batch_size: int = 10_000,
) -> AsyncIterator[list[Record]]:
    """The planned records in batches: archived ranges first (segment by segment, the next one
    fetched while the current is applied), then Kafka up to the planned end offsets."""
    for part in plan.partitions:
        if not part.segments:
            continue
        assert store is not None
        pending: asyncio.Task[list[Record]] | None = asyncio.ensure_future(
            asyncio.to_thread(store.read_segment, part.segments[0])
        )
        for i in range(len(part.segments)):
            assert pending is not None
            records = await pending
            pending = (
                asyncio.ensure_future(asyncio.to_thread(store.read_segment, part.segments[i + 1]))
                if i + 1 < len(part.segments)
                else None
            )
            chosen = [r for r in records if part.start <= r.offset < part.archive_end]
            for j in range(0, len(chosen), batch_size):
                yield chosen[j : j + batch_size]
    async for batch in _read_kafka(settings, plan, batch_size):
        yield batch


async def _read_kafka(settings: Settings, plan: ReplayPlan, batch_size: int) -> AsyncIterator[list[Record]]:
    todo = {p.partition: p for p in plan.partitions if p.archive_end < p.end}
    if not todo:
        return
    consumer = _consumer(settings)
    await consumer.start()
    try:
        tps = {p: TopicPartition(plan.topic, p) for p in todo}
        consumer.assign(list(tps.values()))
        for p, part in todo.items():
            consumer.seek(tps[p], part.archive_end)
        # Batches of `batch_size` whatever a fetch returns: each ClickHouse insert has a fixed cost.
        batch: list[Record] = []
        while todo:
            try:
                fetched = await consumer.getmany(
                    *[tps[p] for p in todo], timeout_ms=500, max_records=batch_size
                )
            except OffsetOutOfRangeError as exc:
                raise ReplayGapError(
                    f"Kafka dropped records of {plan.topic} while the replay read them ({exc}); "
                    "run the replay again (it will read them from the archive)"
                ) from None
            for tp, records in fetched.items():
                end = todo[tp.partition].end if tp.partition in todo else -1
                for r in records:
                    if r.offset >= end:
                        break
                    batch.append(
                        Record(
                            tp.topic,
                            tp.partition,
                            r.offset,
                            r.key,
                            r.value,
                            r.timestamp,
                            tuple(r.headers or ()),
                        )
                    )
            for p in list(todo):
                if await consumer.position(tps[p]) >= todo[p].end:
                    del todo[p]
                    consumer.pause(tps[p])
            if len(batch) >= batch_size or (batch and not todo):
                yield batch
                batch = []
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


def since_time(records: list[Record], plan: ReplayPlan, started: set[int]) -> list[Record]:
    """With --from-time: drop each partition's records before its first one at or after the time."""
    if not plan.partitions or plan.partitions[0].from_time_ms is None:
        return records
    t = plan.partitions[0].from_time_ms
    kept: list[Record] = []
    for r in records:
        if r.partition not in started:
            if r.timestamp_ms < t:
                continue
            started.add(r.partition)
        kept.append(r)
    return kept
