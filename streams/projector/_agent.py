"""The projector: conversation events to ClickHouse, in batches, at least once.

Per batch: decode every record (an undecodable one is handed back for the dead-letter topic),
build rows (`project`, pure) and insert them; the consumer commits the offsets only after
ClickHouse has the rows (the insert runs while the next batch's rows are built: `overlap_inserts`).
A crash before that redelivers the batch; writing it again is harmless because every table
deduplicates (see schemas/clickhouse).
"""

from __future__ import annotations

import asyncio
import functools
import logging
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
    (`pending_write`). One insert at a time, in batch order.

    After an insert that failed so, inserts are made inside `process` again until the records of
    the failed batch have been applied again that way (the consumer starts again from its last
    commit, so they come again, unless their partition went to another member): an outage is then
    retried in place, and a row ClickHouse refuses for good is isolated and dead-lettered, as
    without the overlap. (A failure seen only by a commit would start the consumer again, over
    and over.) A batch the consumer isolates a poison record in is inserted inside `process` too
    (`inline_writes`). Measured: RESULTS.md, "The projector builds the next batch while this one
    inserts"."""

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
        # Inserts of batches processed since the consumer last asked (its commit awaits them all).
        self._pending: list[asyncio.Task[int]] = []
        # Inline until these (partition -> last offset of a batch whose deferred insert failed)
        # are applied inline again: `_inline_done` is how far inline inserts have got since the
        # consumer was assigned its partitions again (it starts again after such a failure, from
        # its last commit; batches processed before that do not count).
        self._inline_through: dict[int, int] = {}
        self._inline_done: dict[int, int] = {}
        self._reassigned = True
        self._isolating = False

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        # The erasure registry's read begins with the consumer (as the sessions worker's does),
        # so the first batch seldom waits for it; process() still waits for it, bounded.
        if self._erasures is not None:
            self._erasures.begin()
        # A partition that went to another member is applied again there, not here.
        for p in [p for p in self._inline_through if p not in partitions]:
            del self._inline_through[p]
        self._inline_done.clear()
        self._reassigned = True
        # Kafka's committed offsets are the projector's position: ClickHouse deduplicates anything
        # applied again after them.

    async def on_revoked(self, partitions: set[int]) -> None:
        return None

    async def idle(self, consumer: PartitionControl) -> None:
        return None

    async def healthy(self) -> bool:
        await self._previous_insert()  # the client is not for concurrent use
        await asyncio.to_thread(self._client.query, f"SELECT count() FROM {DATABASE}.events WHERE 0")
        return True

    def inline_writes(self) -> None:
        """The consumer is isolating a failing record: until `pending_write`, each part's insert
        is made inside `process`, so its failure is the part's."""
        self._isolating = True

    async def process(self, records: Sequence[Record]) -> Rejected:
        last = _last_offsets(records)
        if self._erasures is not None:
            await self._erasures.start()
            records = self._erasures.erasures.filter(list(records))
        rows, rejected = rows_of(records)  # while the previous batch's insert runs
        # One insert at a time, in order. Its outcome is its own commit's to see (a failure has
        # made `_inline_through` non-empty by now: done callbacks run before this resumes).
        await self._previous_insert()
        if self._overlap and not self._inline_through and not self._isolating:
            task = asyncio.ensure_future(insert_batch(self._client, rows))
            task.add_done_callback(functools.partial(self._inserted, last=last))
            self._inflight = task
            self._pending.append(task)
        else:
            self.stats.rows += await insert_batch(self._client, rows)
            if self._reassigned:
                for p, o in last.items():
                    self._inline_done[p] = max(self._inline_done.get(p, -1), o)
        self.stats.batches += 1
        self.stats.events += len(records) - len(rejected)
        self.stats.dead_lettered += len(rejected)
        return rejected

    async def _previous_insert(self) -> None:
        if self._inflight is not None:
            await asyncio.wait({self._inflight})
            self._inflight = None

    def pending_write(self) -> Awaitable[Any] | None:
        """The inserts of the batches processed since the last call, still to be awaited. Called
        once the consumer has applied a batch whole (isolation included)."""
        self._isolating = False
        if (
            self._inline_through
            and self._reassigned
            and all(self._inline_done.get(p, -1) >= o for p, o in self._inline_through.items())
        ):
            log.info("projector: the batch whose insert failed is applied again; overlapping inserts again")
            self._inline_through.clear()
            self._inline_done.clear()
        pending, self._pending = self._pending, []
        if not pending:
            return None
        if len(pending) == 1:
            return pending[0]
        gathered = asyncio.gather(*pending)
        gathered.add_done_callback(_retrieved)  # also when no commit ever awaits it
        return gathered

    def _inserted(self, task: asyncio.Task[int], last: dict[int, int]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # read here: a failure whose commit never came is not "never retrieved"
        if error is None:
            self.stats.rows += task.result()
            return
        for p, o in last.items():
            self._inline_through[p] = max(self._inline_through.get(p, -1), o)
        self._inline_done.clear()
        self._reassigned = False
        log.warning(
            "projector: an insert failed after its batch was processed (%r); inserting inside each "
            "batch until its records are applied again",
            error,
        )


def _last_offsets(records: Sequence[Record]) -> dict[int, int]:
    last: dict[int, int] = {}
    for r in records:
        if r.offset > last.get(r.partition, -1):
            last[r.partition] = r.offset
    return last


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
