"""The projector: conversation events to ClickHouse, in batches, at least once.

Per batch: decode every record (an undecodable one is handed back for the dead-letter topic),
build rows (`project`, pure), insert them, and only then return, so the consumer commits the
offsets after ClickHouse has the rows. A crash before that redelivers the batch; writing it again
is harmless because every table deduplicates (see schemas/clickhouse).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from schemas.events import Event, EventDecodeError, decode_event
from services.analytics._clickhouse import DATABASE
from services.settings import Settings
from streams._consumer import BatchConsumer, PartitionControl, Record, Rejected, instance_id
from streams.projector._gc import gc_paused
from streams.projector._rows import ProjectionBatch, project
from streams.projector._sink import insert_batch

if TYPE_CHECKING:
    from streams.privacy.erasures import ErasureFollower

log = logging.getLogger(__name__)

# Every insert has a fixed cost in ClickHouse (a part per table, the materialized views run per
# insert: ~15-20 ms per table here whatever its size), so the projector waits up to this long for
# a fuller batch; it bounds how long an event waits before it is visible in ClickHouse.
LINGER_S = 0.5


@dataclass(slots=True)
class ProjectorStats:
    batches: int = 0
    events: int = 0
    rows: int = 0
    dead_lettered: int = 0


class RecordLike(Protocol):
    """What `rows_of` reads of a record: a `Record`, or a replay worker's lighter tuple."""

    @property
    def value(self) -> bytes | None: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=RecordLike)


def rows_of(records: Sequence[R]) -> tuple[ProjectionBatch, list[tuple[R, BaseException]]]:
    """Rows for every record that decodes and projects; the others with their error."""
    with gc_paused():
        return _rows_of(records)


def _rows_of(records: Sequence[R]) -> tuple[ProjectionBatch, list[tuple[R, BaseException]]]:
    rejected: list[tuple[R, BaseException]] = []
    # The record is the event's position (it has partition and offset): no object per event.
    decoded: list[tuple[Event, R]] = []
    for r in records:
        try:
            decoded.append((decode_event(r.value), r))
        except EventDecodeError as exc:
            rejected.append((r, exc))
    try:
        return project(decoded), rejected
    except Exception:
        pass
    # Some event makes the (pure) row builder raise: find it, event by event.
    good: list[tuple[Event, R]] = []
    for item in decoded:
        try:
            project([item])
            good.append(item)
        except Exception as exc:
            rejected.append((item[1], exc))
    return project(good), rejected


class ProjectorProcessor:
    name = "projector"

    def __init__(self, client: Any, erasures: ErasureFollower | None = None) -> None:
        self._client = client
        self.stats = ProjectorStats()
        # Erased customers' events still in the log are skipped (streams/privacy/erasures.py).
        self._erasures = erasures

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        # The erasure registry's read begins with the consumer (as the sessions worker's does),
        # so the first batch seldom waits for it; process() still waits for it, bounded.
        if self._erasures is not None:
            self._erasures.begin()
        # Kafka's committed offsets are the projector's position: ClickHouse deduplicates anything
        # applied again after them.

    async def on_revoked(self, partitions: set[int]) -> None:
        return None

    async def idle(self, consumer: PartitionControl) -> None:
        return None

    async def healthy(self) -> bool:
        import asyncio

        await asyncio.to_thread(self._client.query, f"SELECT count() FROM {DATABASE}.events WHERE 0")
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        if self._erasures is not None:
            await self._erasures.start()
            records = self._erasures.erasures.filter(list(records))
        rows, rejected = rows_of(records)
        written = await insert_batch(self._client, rows)
        self.stats.batches += 1
        self.stats.events += len(records) - len(rejected)
        self.stats.rows += written
        self.stats.dead_lettered += len(rejected)
        return rejected


def projector_consumer(
    settings: Settings, client: Any, batch_size: int | None = None
) -> tuple[BatchConsumer, ProjectorProcessor]:
    from streams.privacy.erasures import ErasureFollower

    processor = ProjectorProcessor(client, ErasureFollower(settings))
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id="switchboard-projector",
        batch_size=batch_size or settings.projector_batch_size,
        instance_id=instance_id(settings, "projector"),
        linger_s=LINGER_S,
    )
    return consumer, processor
