"""`switchboard replay`: rebuild state from the log (archive, then Kafka), then swap it in."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

from schemas import hotview as hv
from schemas.events import EventDecodeError, decode_event
from services.analytics import DATABASE
from services.settings import Settings
from streams._consumer import Record
from streams.archive import ArchiveStore
from streams.privacy._retention import replay_filter
from streams.projector._gc import gc_paused
from streams.replay._knowledge import KnowledgeTarget
from streams.replay._progress import Progress
from streams.replay._projections import (
    ProjectionTarget,
    clickhouse_client,
    create_scratch,
    drop_database,
    exchange_tables,
    table_checksums,
)
from streams.replay._sessions import (
    SessionsTarget,
    group_members,
    hot_view_snapshot,
    live_db,
    of_tenant,
    prepare_scratch,
    redis_for,
    snapshot_differences,
    swap_into_live,
)
from streams.replay._source import ReplayError, ReplayPlan, plan_replay, read_log, since_time

TARGETS = ("projections", "knowledge", "sessions")
SESSIONS_GROUP = "switchboard-sessions"
PROJECTOR_GROUP = "switchboard-projector"
COMPARE_ATTEMPTS = 3
# Batches between the full garbage collections of a projections replay (see _feed_projections).
GC_EVERY = 10


@dataclass(slots=True)
class ReplayOptions:
    target: str = "all"
    from_offset: int | None = None
    from_time_ms: int | None = None
    tenant: str | None = None
    dry_run: bool = False
    # False: rebuild into the scratch storage and compare it with the live state, change nothing.
    swap: bool = True
    # Swap the hot view even though the sessions worker's group has members.
    force: bool = False
    # Keep the previous projections (in the scratch database) after the swap.
    keep_old: bool = False
    topic: str | None = None
    batch_size: int = 20_000
    use_archive: bool = True
    # Processes that build projection rows (0: a thread of this process).
    workers: int = 0


@dataclass(slots=True)
class ReplaySummary:
    target: str
    mode: str
    events: int = 0
    read: int = 0
    rejected: int = 0
    seconds: float = 0.0
    from_archive: int = 0
    offsets: int = 0
    swapped: bool = False
    identical: bool | None = None
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"{self.target} ({self.mode}): {self.read:,} records read, {self.events:,} applied, {self.rejected:,} refused "
            f"(dead-lettered by the live processor too), {self.from_archive:,} offsets from the S3 archive, "
            f"{self.seconds:.1f}s, {self.rate:,.0f} ev/s"
        ]
        if self.identical is not None:
            out.append(f"  identical to the live state: {'yes' if self.identical else 'NO'}")
        out.extend(f"  {d}" for d in self.differences)
        out.extend(f"  {n}" for n in self.notes)
        return out


Apply = Callable[[Sequence[Record]], Awaitable[tuple[int, int]]]


async def _feed(
    settings: Settings,
    store: ArchiveStore | None,
    plan: ReplayPlan,
    apply: Apply,
    progress: Progress,
    batch_size: int,
    keep: Callable[[Record], bool] | None = None,
    flush: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Read the planned records and apply them in batches, the next batch read while one is
    applied; `progress` counts records read, `applied` / `rejected` what the target took."""
    queue: asyncio.Queue[list[Record] | None] = asyncio.Queue(maxsize=2)

    async def reader() -> None:
        async for batch in read_log(settings, store, plan, batch_size):
            await queue.put(batch)
        await queue.put(None)

    reading = asyncio.ensure_future(reader())
    try:
        started: set[int] = set()
        while (batch := await queue.get()) is not None:
            records = since_time(batch, plan, started)
            if keep is not None:
                records = [r for r in records if keep(r)]
            applied, refused = await apply(records) if records else (0, 0)
            progress.applied += applied
            progress.advance(len(batch), refused)
        await reading
        if flush is not None:
            await flush()
    finally:
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


async def _feed_projections(
    settings: Settings,
    store: ArchiveStore | None,
    plan: ReplayPlan,
    target: ProjectionTarget,
    progress: Progress,
    batch_size: int,
    keep: Callable[[Record], bool] | None = None,
) -> None:
    """`_feed` for projections: a reader task reads the log and hands each batch to a row
    builder (up to `workers` + 1 batches in hand: in other processes with a pool), while this
    loop inserts the built batches in log order, one insert in flight. Neither waits for the
    other but through that bound (the reader used to wait for each insert before reading on)."""
    ahead = max(1, target.workers)
    queue: asyncio.Queue[tuple[asyncio.Future[Any], int, int] | None] = asyncio.Queue(maxsize=ahead)
    building: list[asyncio.Future[Any]] = []

    async def reader() -> None:
        started: set[int] = set()
        batches = 0
        async for batch in read_log(settings, store, plan, batch_size):
            records = since_time(batch, plan, started)
            if keep is not None:
                records = [r for r in records if keep(r)]
            future = asyncio.ensure_future(target.build(records))
            building.append(future)
            await queue.put((future, len(batch), len(records)))
            batches += 1
            if batches % GC_EVERY == 0:
                gc.collect()
        await queue.put(None)

    # The cyclic GC is paused while the log streams through (a full collection every GC_EVERY
    # batches instead): each batch's tens of thousands of records live until it is handed on,
    # and the collections their allocation triggered cost more than reading them (8.6 -> 3.0 us
    # CPU per record read from Kafka, measured).
    with gc_paused():
        reading = asyncio.ensure_future(reader())
        try:
            while (item := await _next(queue, reading)) is not None:
                future, read, count = item
                built = await future
                building.remove(future)
                applied, refused = await target.insert(built, count)
                progress.applied += applied
                progress.advance(read, refused)
            await reading
            await target.flush()
        finally:
            for task in (reading, *building):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


async def _next(queue: asyncio.Queue[Any], reading: asyncio.Future[None]) -> Any:
    """The next item of the reader's queue, or the reader's error if it failed first."""
    getting = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getting, reading}, return_when=asyncio.FIRST_COMPLETED)
    if getting in done:
        return getting.result()
    getting.cancel()
    reading.result()  # raises the reader's error
    return await queue.get()  # the reader finished: its last put is there


def _tenant_filter(tenant: str | None) -> Callable[[Record], bool] | None:
    if tenant is None:
        return None

    def keep(r: Record) -> bool:
        try:
            return decode_event(r.value).tenant_id == tenant
        except EventDecodeError:
            return False

    return keep


def _store(settings: Settings, options: ReplayOptions) -> ArchiveStore | None:
    return ArchiveStore(settings) if options.use_archive else None


async def replay(
    settings: Settings, options: ReplayOptions, out: TextIO | None = None
) -> list[ReplaySummary]:
    targets = TARGETS if options.target == "all" else (options.target,)
    partial = options.from_offset is not None or options.from_time_ms is not None
    if partial and ("sessions" in targets or "knowledge" in targets):
        # Checked before anything runs: these folds need the whole log.
        raise ReplayError(
            "the hot view and the knowledge base are folds of the whole log: replay them from the "
            "beginning (no --from-*); --from-* re-projects part of the log into the projections only"
        )
    if "sessions" in targets and options.swap and not options.dry_run and not options.force:
        # Before anything is rebuilt: `all` must not swap projections, then stop at sessions.
        await _sessions_worker_stopped(settings)
    summaries: list[ReplaySummary] = []
    for target in targets:
        if target == "projections":
            summaries.append(await replay_projections(settings, options, out))
        elif target == "knowledge":
            summaries.append(await replay_knowledge(settings, options, out))
        elif target == "sessions":
            summaries.append(await replay_sessions(settings, options, out))
        else:
            raise ReplayError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)} or all")
    return summaries


def _dry(target: str, plan: ReplayPlan) -> ReplaySummary:
    summary = ReplaySummary(target, "dry run", offsets=plan.offsets, from_archive=plan.from_archive)
    for p in plan.partitions:
        summary.notes.append(
            f"partition {p.partition}: offsets {p.start}..{p.end - 1} "
            f"({max(0, p.archive_end - p.start)} from {len(p.segments)} archived segments, "
            f"{p.end - p.archive_end} from Kafka)"
        )
    return summary


async def replay_projections(
    settings: Settings, options: ReplayOptions, out: TextIO | None = None
) -> ReplaySummary:
    topic = options.topic or settings.conversation_topic
    store = _store(settings, options)
    plan = await plan_replay(
        settings, store, topic, from_offset=options.from_offset, from_time_ms=options.from_time_ms
    )
    if options.dry_run:
        return _dry("projections", plan)
    client = clickhouse_client(settings)
    # Erased customers' events still in the log, and events past their tenant's retention, stay
    # out of the rebuilt projections.
    erased = await replay_filter(settings)
    pool = ProcessPoolExecutor(options.workers) if options.workers > 0 else None
    keep = _tenant_filter(options.tenant)
    in_place = (
        options.from_offset is not None or options.from_time_ms is not None or options.tenant is not None
    )
    t0 = time.monotonic()
    try:
        if in_place:
            # Part of the log only: re-project it into the live tables (they deduplicate; a
            # ReplacingMergeTree keeps the version written last, so corrected rows replace old ones).
            if not options.swap:
                raise ReplayError("--no-swap compares a full rebuild; it takes no --from-*/--tenant")
            target = ProjectionTarget(client, DATABASE, pool, options.workers, erased)
            progress = Progress("projections (in place)", plan.offsets, out=out)
            await _feed_projections(settings, store, plan, target, progress, options.batch_size, keep)
            progress.finish()
            return ReplaySummary(
                "projections",
                "in place",
                events=progress.applied,
                read=progress.done,
                rejected=progress.rejected,
                seconds=time.monotonic() - t0,
                from_archive=plan.from_archive,
                offsets=plan.offsets,
            )
        scratch = settings.replay_database
        create_scratch(client, scratch)
        target = ProjectionTarget(client, scratch, pool, options.workers, erased)
        progress = Progress("projections", plan.offsets, out=out)
        await _feed_projections(settings, store, plan, target, progress, options.batch_size)
        summary = ReplaySummary(
            "projections", "rebuild", from_archive=plan.from_archive, offsets=plan.offsets
        )
        if not options.swap:
            reached = plan.ends
            for _ in range(COMPARE_ATTEMPTS):
                if topic == settings.conversation_topic:
                    # Compare at the live projector's position: bring the rebuild there first.
                    live_at = await _settled_position(settings, PROJECTOR_GROUP, topic)
                    more = {p: o for p, o in live_at.items() if o > reached.get(p, 0)}
                    if more:
                        catch_up = await plan_replay(settings, None, topic, from_offset=reached)
                        for part in catch_up.partitions:
                            part.end = max(part.start, min(part.end, live_at.get(part.partition, 0)))
                        await _feed_projections(
                            settings, None, catch_up, target, progress, options.batch_size
                        )
                        reached = {**reached, **{p: max(o, reached.get(p, 0)) for p, o in live_at.items()}}
                live_sums = table_checksums(client, DATABASE)
                new_sums = table_checksums(client, scratch)
                summary.differences = [
                    f"{t}: live {live_sums.get(t)} rebuilt {new_sums.get(t)}"
                    for t in sorted(set(live_sums) | set(new_sums))
                    if live_sums.get(t) != new_sums.get(t)
                ]
                if not summary.differences or topic != settings.conversation_topic:
                    break
                # The live projector may have moved on meanwhile: compare again at its new position.
            progress.finish()
            summary.identical = not summary.differences
            summary.notes.append(
                f"rebuilt tables left in database {scratch} for inspection; live tables untouched"
            )
        else:
            # Close the distance to the live log, swap, then re-apply whatever the live projector
            # wrote into the old tables after the replay's end.
            catch_up = await plan_replay(settings, None, topic, from_offset=plan.ends)
            await _feed(
                settings, None, catch_up, target.apply, progress, options.batch_size, flush=target.flush
            )
            swapped = exchange_tables(client, scratch)
            live = ProjectionTarget(client, DATABASE, pool, options.workers, erased)
            after = await plan_replay(settings, None, topic, from_offset=catch_up.ends)
            await _feed_projections(settings, None, after, live, progress, options.batch_size)
            progress.finish()
            summary.swapped = True
            summary.notes.append(f"exchanged {len(swapped)} tables: {', '.join(swapped)}")
            if options.keep_old:
                summary.notes.append(f"previous tables kept in database {scratch}")
            else:
                drop_database(client, scratch)
        summary.events, summary.rejected, summary.read = progress.applied, progress.rejected, progress.done
        summary.seconds = time.monotonic() - t0
        return summary
    finally:
        client.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)


async def replay_sessions(
    settings: Settings, options: ReplayOptions, out: TextIO | None = None
) -> ReplaySummary:
    if options.from_offset is not None or options.from_time_ms is not None:
        raise ReplayError(
            "the hot view is a fold of the whole log: replay sessions from the beginning (no --from-*)"
        )
    topic = options.topic or settings.conversation_topic
    store = _store(settings, options)
    plan = await plan_replay(settings, store, topic)
    if options.dry_run:
        return _dry("sessions", plan)
    if options.swap and not options.force:
        await _sessions_worker_stopped(settings)
    t0 = time.monotonic()
    scratch = await prepare_scratch(settings)
    live = redis_for(settings, live_db(settings))
    try:
        target = SessionsTarget(settings, scratch)
        progress = Progress("sessions", plan.offsets, out=out)
        keep = _tenant_filter(options.tenant)
        await _feed(settings, store, plan, target.apply, progress, options.batch_size, keep)
        await target.finish(plan.ends if options.tenant is None else {})
        progress.finish()
        summary = ReplaySummary(
            "sessions",
            "rebuild",
            events=progress.applied,
            read=progress.done,
            rejected=progress.rejected,
            from_archive=plan.from_archive,
            offsets=plan.offsets,
        )
        if not options.swap:
            reached = plan.ends
            for _ in range(COMPARE_ATTEMPTS):
                if topic == settings.conversation_topic:
                    # Compare at the live worker's position: bring the rebuild there first.
                    raw = await live.hgetall(hv.APPLIED_KEY)
                    live_at = {int(p): int(o) for p, o in raw.items()}
                    if any(o > reached.get(p, 0) for p, o in live_at.items()):
                        catch_up = await plan_replay(settings, None, topic, from_offset=reached)
                        for part in catch_up.partitions:
                            part.end = max(part.start, min(part.end, live_at.get(part.partition, 0)))
                        await _feed(
                            settings, None, catch_up, target.apply, progress, options.batch_size, keep
                        )
                        reached = {p: max(o, live_at.get(p, 0)) for p, o in reached.items()}
                summary.differences = snapshot_differences(
                    await hot_view_snapshot(live, options.tenant),
                    await hot_view_snapshot(scratch, options.tenant),
                )
                if not summary.differences:
                    break
            summary.identical = not summary.differences
            summary.notes.append(f"rebuilt hot view left in Redis db {settings.replay_redis_db}")
        elif options.tenant is not None:
            copied = await _replace_tenant(settings, scratch, live, options.tenant)
            summary.swapped = True
            summary.notes.append(f"replaced {copied} keys of tenant {options.tenant} (COPY … REPLACE)")
        else:
            carried = await swap_into_live(settings, scratch)
            summary.swapped = True
            summary.notes.append(
                f"SWAPDB {live_db(settings)} <-> {settings.replay_redis_db} ({carried} newer live keys carried "
                "over); start the sessions worker: writes are refused until it marks the partitions ready"
            )
        summary.seconds = time.monotonic() - t0
        return summary
    finally:
        await scratch.aclose()
        await live.aclose()


async def _settled_position(
    settings: Settings, group: str, topic: str, within_s: float = 30.0
) -> dict[int, int]:
    """A consumer group's committed offsets once they have not moved for a second (or after
    `within_s`): the position a comparison with the live state is made at."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or await _partitions(settings, topic))
        deadline = time.monotonic() + within_s
        last: dict[int, int] | None = None
        while True:
            now = {p: int(await consumer.committed(TopicPartition(topic, p)) or 0) for p in partitions}
            if now == last or time.monotonic() > deadline:
                return now
            last = now
            await asyncio.sleep(1.0)
    finally:
        await consumer.stop()


async def _partitions(settings: Settings, topic: str) -> list[int]:
    from streams.replay._source import kafka_offsets

    _, ends = await kafka_offsets(settings, topic)
    return sorted(ends)


async def _sessions_worker_stopped(settings: Settings) -> None:
    members = await group_members(settings, SESSIONS_GROUP)
    if members:
        raise ReplayError(
            f"the sessions worker is running ({members} member(s) in group {SESSIONS_GROUP}): stop it, "
            "replay, then start it again (it resumes from the replay's end); or use --no-swap to "
            "rebuild and compare without touching the live hot view"
        )


async def _replace_tenant(settings: Settings, scratch: Any, live: Any, tenant: str) -> int:
    """The tenant's rebuilt keys over the live ones (claims are kept: in-flight writes own theirs)."""
    copied = 0
    rebuilt: set[bytes] = set()
    async for key in scratch.scan_iter(match=f"sb:{{{tenant}*", count=1000):
        if not of_tenant(key.decode(), tenant) or key.decode() == hv.documents_key(tenant):
            continue
        rebuilt.add(key)
        await scratch.copy(key, key, destination_db=str(live_db(settings)), replace=True)
        copied += 1
    async for key in live.scan_iter(match=f"sb:{{{tenant}*", count=1000):
        text = key.decode()
        if (
            of_tenant(text, tenant)
            and key not in rebuilt
            and (text.endswith((":conv", ":live", ":open")) or ":queue:" in text)
        ):
            await live.delete(key)
    return copied


async def replay_knowledge(
    settings: Settings, options: ReplayOptions, out: TextIO | None = None
) -> ReplaySummary:
    if options.from_offset is not None or options.from_time_ms is not None:
        raise ReplayError("the knowledge base is a fold of its whole (compacted) topic: no --from-*")
    plan = await plan_replay(settings, None, settings.knowledge_topic)
    if options.dry_run:
        return _dry("knowledge", plan)
    t0 = time.monotonic()
    scratch = await prepare_scratch(settings)
    try:
        target = KnowledgeTarget(scratch, options.tenant)
        progress = Progress("knowledge", plan.offsets, out=out)
        await _feed(settings, None, plan, target.apply, progress, options.batch_size)
        progress.finish()
        summary = ReplaySummary(
            "knowledge",
            "rebuild",
            events=progress.applied,
            read=progress.done,
            rejected=progress.rejected,
            offsets=plan.offsets,
        )
        if options.swap:
            replaced = await target.swap(settings)
            summary.swapped = True
            summary.notes.append(
                f"documents of {replaced} tenant(s) replaced; restart the assistants to rebuild their "
                "in-memory retrieval index (they fold the same topic at start)"
            )
        summary.seconds = time.monotonic() - t0
        return summary
    finally:
        await scratch.aclose()
