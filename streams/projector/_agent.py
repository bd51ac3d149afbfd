"""The projector: conversation events to ClickHouse, in batches, at least once.

Per batch: decode every record (an undecodable one is handed back for the dead-letter topic),
build rows (`project`, pure) and insert them; the consumer commits the offsets only after
ClickHouse has the rows (the insert runs while the next batch's rows are built: `overlap_inserts`).
A crash before that redelivers the batch; writing it again is harmless because every table
deduplicates (see schemas/clickhouse).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
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
# After an insert that failed while the next batch was being built: how long inserts are made
# inside `process` again (ProjectorProcessor).
OVERLAP_PAUSE_S = 60.0


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
    """`overlap_inserts`: a batch's insert runs (in its thread) while the next batch's rows are
    built; `process` returns with it under way and the consumer's commit waits for it
    (`pending_write`). One insert at a time, in batch order. After an insert that failed so,
    inserts are made inside `process` again for OVERLAP_PAUSE_S, so that an outage is retried and
    a row ClickHouse refuses for good is found and dead-lettered as before (a failure seen only by
    a commit would only start the consumer again, over and over). Measured: RESULTS.md,
    "The projector builds the next batch while this one inserts"."""

    name = "projector"

    def __init__(
        self, client: Any, erasures: ErasureFollower | None = None, *, overlap_inserts: bool = False
    ) -> None:
        self._client = client
        self.stats = ProjectorStats()
        # Erased customers' events still in the log are skipped (streams/privacy/erasures.py).
        self._erasures = erasures
        self._overlap = overlap_inserts
        self._inflight: asyncio.Task[int] | None = None  # the last insert started, until awaited
        # Inserts of batches processed since the consumer last asked (its commit awaits them all:
        # a batch isolating a poison record is processed in parts before one commit).
        self._pending: list[asyncio.Task[int]] = []
        self._inline_until = 0.0

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
        await asyncio.to_thread(self._client.query, f"SELECT count() FROM {DATABASE}.events WHERE 0")
        return True

    async def process(self, records: Sequence[Record]) -> Rejected:
        if self._erasures is not None:
            await self._erasures.start()
            records = self._erasures.erasures.filter(list(records))
        rows, rejected = rows_of(records)  # while the previous batch's insert runs
        if self._inflight is not None:
            # One insert at a time, in order. Its outcome is its own commit's to see.
            await asyncio.wait({self._inflight})
            self._inflight = None
        if self._overlap and time.monotonic() >= self._inline_until:
            task = asyncio.ensure_future(insert_batch(self._client, rows))
            task.add_done_callback(self._inserted)
            self._inflight = task
            self._pending.append(task)
        else:
            self.stats.rows += await insert_batch(self._client, rows)
        self.stats.batches += 1
        self.stats.events += len(records) - len(rejected)
        self.stats.dead_lettered += len(rejected)
        return rejected

    def pending_write(self) -> Awaitable[Any] | None:
        """The inserts of the batches processed since the last call, still to be awaited."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        return pending[0] if len(pending) == 1 else asyncio.gather(*pending)

    def _inserted(self, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # read here: a failure whose commit never came is not "never retrieved"
        if error is None:
            self.stats.rows += task.result()
            return
        self._inline_until = time.monotonic() + OVERLAP_PAUSE_S
        log.warning(
            "projector: an insert failed after its batch was processed (%r); inserting inside each "
            "batch for the next %.0fs",
            error,
            OVERLAP_PAUSE_S,
        )


def projector_consumer(
    settings: Settings, client: Any, batch_size: int | None = None
) -> tuple[BatchConsumer, ProjectorProcessor]:
    from streams.privacy.erasures import ErasureFollower

    processor = ProjectorProcessor(client, ErasureFollower(settings), overlap_inserts=True)
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
