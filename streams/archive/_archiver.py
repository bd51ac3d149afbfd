"""The archiver: closed segments of a topic's partitions, zstd-compressed, into S3.

It runs on the same consumer as every processor (`streams/_consumer.py`), but its position is
what S3 holds, not Kafka's committed offsets: on assignment it reads the last manifest of each
partition and seeks to the offset after it. It buffers each partition's records in memory and
closes a segment when it reaches `archive_segment_bytes` or its oldest record has waited
`archive_segment_age_s`; a closed segment is written (segment object, then manifest) before the
next one starts. So a kill -9 at any moment loses only the open buffer, which is read again from
Kafka after the restart, and the objects are named by (partition, first offset): a range written
again overwrites the same names. Never a gap, never an overlap, never a half-written segment that
a reader trusts (a segment without its manifest is ignored).

One archiver per partition at a time: the consumer group assigns each partition to one member,
and a member that loses a partition closes what it holds (best effort) before letting go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from services.settings import Settings
from streams._consumer import (
    BatchConsumer,
    PartitionControl,
    Record,
    Rejected,
    instance_id,
    is_outage,
    raise_if_cancelling,
    run_until_signalled,
)
from streams.archive._segment import Manifest
from streams.archive._store import ArchiveStore
from streams.privacy._archive import segment_for
from streams.privacy.erasures import ErasureFollower

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _OpenSegment:
    first_offset: int
    records: list[Record] = field(default_factory=list)
    raw_bytes: int = 0
    opened_monotonic: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class ArchiverStats:
    segments: int = 0
    records: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0


def _record_bytes(r: Record) -> int:
    return 30 + len(r.key or b"") + len(r.value or b"") + sum(len(k) + len(v) + 6 for k, v in r.headers)


class ArchiverProcessor:
    name = "archiver"

    def __init__(
        self, settings: Settings, store: ArchiveStore, topic: str, erasures: ErasureFollower | None = None
    ) -> None:
        self._settings = settings
        # Erased customers' events still in Kafka are left out of new segments (their offsets stay
        # inside the segment's range, without a record, so the chain has no gap).
        self._erasures = erasures
        self._store = store
        self._topic = topic
        self._open: dict[int, _OpenSegment] = {}
        # Per partition: the next offset to take (everything before it is archived or buffered).
        self._next: dict[int, int] = {}
        # Partitions whose position was read from S3 since they were assigned.
        self._ready: set[int] = set()
        # Per partition: the position at which an offset gap was seen (and sought back once).
        self._gap_seen: dict[int, int] = {}
        self._control: PartitionControl | None = None
        self.stats = ArchiverStats()
        self.last_manifest: Manifest | None = None

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        # The erasure registry's read begins with the consumer (as the sessions worker's does),
        # so the first segment seldom waits for it; _close still waits for it, bounded.
        if self._erasures is not None:
            self._erasures.begin()
        self._control = consumer
        delay = 0.2
        pending = set(partitions)
        while pending:
            try:
                await asyncio.to_thread(self._store.ensure_bucket)
                starts = await log_starts(self._settings, self._topic, pending)
                for p in sorted(pending):
                    nxt = await asyncio.to_thread(self._store.next_offset, self._topic, p)
                    self._open.pop(p, None)
                    if nxt is None:
                        nxt = starts.get(p, 0)
                        log.info(
                            "archiver: partition %d has no archive yet; starting at the log start %d", p, nxt
                        )
                    else:
                        log.info("archiver: partition %d continues at offset %d (from S3)", p, nxt)
                    self._next[p] = nxt
                    consumer.seek(p, nxt)
                    self._ready.add(p)
                    pending.discard(p)
            except Exception as exc:
                # Every error, not only outages: aiokafka runs this as a rebalance listener and
                # only logs what it raises, so the partitions would stay assigned and never ready
                # (their records skipped, nothing archived) while the archiver looked alive.
                raise_if_cancelling(exc)
                log.error(
                    "archiver: reading positions of partitions %s from S3: %r; retrying in %.1fs",
                    sorted(pending),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def on_revoked(self, partitions: set[int]) -> None:
        for p in sorted(partitions):
            if p in self._open:
                try:
                    await self._close(p)
                except Exception as exc:  # the next owner reads the range again from Kafka
                    log.warning("archiver: partition %d revoked with its open segment unwritten: %r", p, exc)
            self._open.pop(p, None)
            self._next.pop(p, None)
            self._ready.discard(p)

    async def idle(self, consumer: PartitionControl) -> None:
        try:
            await self._close_aged()
        except Exception as exc:
            if not is_outage(exc):
                raise
            # S3 is away: the segments stay open and are written at a later idle or batch.
            log.error("archiver: closing aged segments: %r; will retry", exc)

    async def healthy(self) -> bool:
        await asyncio.to_thread(self._store.ensure_bucket)
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        # Only records that continue the archive exactly are taken. The consumer may hand over
        # records fetched from Kafka's committed offset (which runs ahead of S3: it is committed
        # when records are buffered) before or around the seek to S3's position; those are
        # skipped, and the partition is sought back to where the archive continues. Records
        # before the position (a retry of this batch after a failed write) are skipped too.
        skip: set[int] = set()
        for r in records:
            p = r.partition
            if p not in self._ready or p in skip:
                continue
            nxt = self._next[p]
            if r.offset < nxt:
                continue
            if r.offset > nxt and self._gap_seen.get(p) != nxt:
                # Either a fetch from elsewhere, or offsets Kafka really has no record for
                # (transaction markers): seek back once; if the same gap comes again, it is real.
                self._gap_seen[p] = nxt
                if self._control is not None:
                    self._control.seek(p, nxt)
                skip.add(p)
                continue
            segment = self._open.get(p)
            if segment is None:
                segment = self._open[p] = _OpenSegment(nxt)
            segment.records.append(r)
            segment.raw_bytes += _record_bytes(r)
            self._next[p] = r.offset + 1
            if segment.raw_bytes >= self._settings.archive_segment_bytes:
                await self._close(p)
        await self._close_aged()
        return []

    async def _close_aged(self) -> None:
        now = time.monotonic()
        for p, segment in list(self._open.items()):
            if now - segment.opened_monotonic >= self._settings.archive_segment_age_s:
                await self._close(p)

    async def flush(self) -> None:
        """Close every open segment (on a clean stop)."""
        for p in sorted(self._open):
            await self._close(p)

    async def _close(self, partition: int) -> None:
        segment = self._open.get(partition)
        if segment is None or not segment.records:
            self._open.pop(partition, None)
            return
        last = self._next[partition] - 1
        records = segment.records
        if self._erasures is not None:
            await self._erasures.start()
            records = self._erasures.erasures.filter(records)
        stored, manifest = await asyncio.to_thread(
            segment_for,
            self._store.prefix,
            self._topic,
            partition,
            segment.first_offset,
            last,
            records,
            self._settings.archive_zstd_level,
        )
        await asyncio.to_thread(self._store.write_segment, stored, manifest)
        # Only now is the range durable; until here a failure leaves the buffer for a retry.
        self._open.pop(partition, None)
        self.stats.segments += 1
        self.stats.records += manifest.count
        self.stats.raw_bytes += manifest.raw_bytes
        self.stats.stored_bytes += manifest.stored_bytes
        self.last_manifest = manifest
        log.info(
            "archived %s/%d offsets %d..%d: %d records, %d -> %d bytes",
            self._topic,
            partition,
            manifest.first_offset,
            manifest.last_offset,
            manifest.count,
            manifest.raw_bytes,
            manifest.stored_bytes,
        )


async def log_starts(settings: Settings, topic: str, partitions: set[int]) -> dict[int, int]:
    """Kafka's log start offset per partition (where an empty archive begins)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        starts = await consumer.beginning_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(o) for tp, o in starts.items()}
    finally:
        await consumer.stop()


def archiver_consumer(
    settings: Settings, store: ArchiveStore | None = None, topic: str | None = None
) -> tuple[BatchConsumer, ArchiverProcessor]:
    topic = topic or settings.conversation_topic
    erasures = ErasureFollower(settings) if topic == settings.conversation_topic else None
    processor = ArchiverProcessor(settings, store or ArchiveStore(settings), topic, erasures)
    consumer = BatchConsumer(
        settings,
        processor,
        topic=topic,
        group_id=f"switchboard-archiver-{topic}"
        if topic != settings.conversation_topic
        else "switchboard-archiver",
        batch_size=settings.projector_batch_size,
        instance_id=instance_id(settings, "archiver"),
    )
    return consumer, processor


async def serve_archiver(settings: Settings) -> None:
    consumer, processor = archiver_consumer(settings)
    retention: asyncio.Task[None] | None = None
    if settings.retention_interval_s > 0:
        # Per-tenant retention, applied here because the archiver always runs (make run).
        from streams.privacy._retention import retention_loop

        retention = asyncio.ensure_future(retention_loop(settings, settings.retention_interval_s))

    async def flush() -> None:
        if retention is not None:
            retention.cancel()
        try:
            await processor.flush()
        except Exception as exc:  # read again from Kafka by the next run
            log.warning("archiver: open segments not written at stop: %r", exc)

    await run_until_signalled(consumer, flush)


def run_archiver(settings: Settings, loglevel: str = "info") -> None:
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve_archiver(settings))
