"""Guard against records a Faust consumer fetched but never delivered.

Faust's consumer stops iterating a fetched batch when flow control or the group generation
changes under it (faust/transport/consumer.py) and relies on a later seek to fetch the rest
again; around table recovery that seek can come first, and the records in between are never
delivered. Faust then commits past them as if they were a legitimate offset gap. Our producers
are idempotent and not transactional, so the offsets of an event topic are contiguous: any gap
between two delivered offsets of a partition, or between the committed offset and the first
delivered one after an assignment, is such a loss. This guard finds those gaps and reads the
missing records straight from Kafka, so the processor folds them before what follows them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecordPosition:
    topic: str
    partition: int
    offset: int
    key: bytes | None


@dataclass(frozen=True, slots=True)
class RefetchedRecord:
    """Shaped like the Faust events processors read (`.message.partition`, `.value`, ...)."""

    message: RecordPosition
    value: bytes | None


class DeliveryGapGuard:
    def __init__(self, bootstrap: str, topic: str, group_id: str) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._group_id = group_id
        self._next: dict[int, int] = {}
        self._committed: dict[int, int] | None = None
        self.filled = 0

    def watch(self, app: Any) -> None:
        """Reset on every partition assignment of the Faust app."""

        async def on_assigned(sender: Any, *args: Any, **kwargs: Any) -> None:
            self.reset()

        app.on_partitions_assigned.connect(on_assigned, weak=False)

    def reset(self) -> None:
        """Forget positions (on every (re)assignment: where a partition resumes is the committed
        offset, read again on first sight)."""
        self._next.clear()
        self._committed = None

    async def missing_before(self, batch: Sequence[Any]) -> list[RefetchedRecord]:
        """The records that should have been delivered before this batch's (Faust events, in
        delivery order) but were not; processing them first keeps each partition in order.
        Positions advance only once the missing records were read, so a retry finds them again."""
        gaps: list[tuple[int, int, int]] = []
        advanced = dict(self._next)
        for item in batch:
            partition, offset = item.message.partition, item.message.offset
            expected = advanced.get(partition)
            if expected is None:
                expected = (await self._committed_offsets()).get(partition, offset)
            if offset > expected:
                gaps.append((partition, expected, offset))
            advanced[partition] = max(offset + 1, expected)
        records: list[RefetchedRecord] = []
        for partition, start, end in gaps:
            log.warning(
                "%s/%d: offsets %d..%d were fetched but never delivered; reading them again",
                self._topic,
                partition,
                start,
                end - 1,
            )
            records.extend(await self._read(partition, start, end))
        self._next = advanced
        self.filled += len(records)
        return records

    async def _committed_offsets(self) -> dict[int, int]:
        if self._committed is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id=f"{self._group_id}-gaps")
            await admin.start()
            try:
                offsets: Any = await admin.list_consumer_group_offsets(self._group_id)
            finally:
                await admin.close()
            self._committed = {
                tp.partition: meta.offset
                for tp, meta in offsets.items()
                if tp.topic == self._topic and meta.offset >= 0
            }
        return self._committed

    async def _read(self, partition: int, start: int, end: int) -> list[RefetchedRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, enable_auto_commit=False, client_id=f"{self._group_id}-gaps"
        )
        await consumer.start()
        try:
            tp = TopicPartition(self._topic, partition)
            consumer.assign([tp])
            consumer.seek(tp, start)
            out: list[RefetchedRecord] = []
            while await consumer.position(tp) < end:
                fetched = await consumer.getmany(tp, timeout_ms=1000, max_records=end - start)
                for record in fetched.get(tp, []):
                    if record.offset < end:
                        position = RecordPosition(self._topic, partition, record.offset, record.key)
                        out.append(RefetchedRecord(position, record.value))
            return out
        finally:
            await consumer.stop()
