"""The projector agent: conversation events to ClickHouse, in batches, at least once.

Per batch: decode every record (undecodable ones go to the dead-letter topic), build rows
(`project`, pure), insert them (retrying until ClickHouse takes them), and only then return to
`take_events`, which acks the batch's events after the loop body for that batch completes.
A crash before the insert finishes redelivers the batch; writing it again is harmless because
every table deduplicates (see schemas/clickhouse).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import faust

from schemas.events import Event, EventDecodeError, LogPosition, decode_event
from services.settings import Settings
from streams._gaps import DeliveryGapGuard
from streams._retry import until_done
from streams.app import conversation_topic
from streams.projector._rows import project
from streams.projector._sink import insert_batch

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


@dataclass(slots=True)
class ProjectorStats:
    batches: int = 0
    events: int = 0
    rows: int = 0
    dead_lettered: int = 0
    failures: int = 0


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("sb-dlq-reason", reason.encode()[:1000]),
        ("sb-dlq-source", f"{topic}/{partition}/{offset}".encode()),
        ("sb-dlq-processor", b"projector"),
    ]


async def _until_done(what: str, attempt: Callable[[], Awaitable[T]], stats: ProjectorStats) -> T:
    """Retry `attempt` until it succeeds; the sink lets a cancellation through only once its
    insert finished, so acking then is safe."""

    def count(_: BaseException) -> None:
        stats.failures += 1

    return await until_done(
        f"projector: {what}",
        attempt,
        log=log,
        initial_s=RETRY_INITIAL_S,
        max_s=RETRY_MAX_S,
        cancel_mid_attempt_is_safe=True,
        on_failure=count,
    )


async def project_batch(batch: Sequence[Any], client: Any, dead_letters: Any, stats: ProjectorStats) -> None:
    """Decode, project and insert one batch of Faust events; returns once ClickHouse has it."""
    records: list[tuple[Event, LogPosition]] = []
    rejected: list[tuple[Any, Any, list[tuple[str, bytes]]]] = []
    for item in batch:
        msg = item.message
        try:
            event = decode_event(item.value)
        except EventDecodeError as exc:
            rejected.append(
                (msg, item.value, dead_letter_headers(str(exc), msg.topic, msg.partition, msg.offset))
            )
            if len(rejected) == 1:
                log.error(
                    "projector: dead-lettering undecodable record %s/%s/%s: %s",
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    exc,
                )
            continue
        records.append((event, LogPosition(msg.partition, msg.offset)))
    if rejected:
        stats.dead_lettered += len(rejected)
        if len(rejected) > 1:
            log.error("projector: %d more undecodable records in this batch dead-lettered", len(rejected) - 1)

        async def send_all() -> None:
            # Send them all, then wait for every ack: the batch is acked right after this body.
            pending = [
                await dead_letters.send(key=msg.key, value=value, headers=headers)
                for msg, value, headers in rejected
            ]
            await asyncio.gather(*pending)

        await _until_done(f"dead-lettering {len(rejected)} records", send_all, stats)
    if not records:
        return
    rows = project(records)
    first, last = batch[0].message, batch[-1].message
    what = (
        f"insert of {len(records)} events ({first.topic} {first.partition}/{first.offset} .. "
        f"{last.partition}/{last.offset})"
    )
    written = await _until_done(what, lambda: insert_batch(client, rows), stats)
    stats.batches += 1
    stats.events += len(records)
    stats.rows += written


def register_projector(
    app: faust.App,
    settings: Settings,
    client: Any,
    *,
    batch_size: int | None = None,
    guard_delivery_gaps: bool = True,
) -> ProjectorStats:
    """Add the projector agent to `app`; it inserts through the clickhouse-connect `client`.

    `batch_size` (default ``settings.batch_size``) caps the events per batch. Each ClickHouse
    insert has a fixed cost (a new part; ~20-40 ms on chdb here whatever its size), so under
    load larger batches project faster; ``settings.batch_within_s`` bounds the wait when idle.
    """
    size = batch_size or settings.batch_size
    topic = conversation_topic(app, settings)
    dead_letters = app.topic(
        settings.dead_letter_topic, key_serializer="raw", value_serializer="raw", internal=False
    )
    stats = ProjectorStats()
    # Off only for Faust's broker-less test channel, where there is no Kafka to read from.
    guard = DeliveryGapGuard(settings.kafka_bootstrap, settings.conversation_topic, app.conf.id)
    if guard_delivery_gaps:
        guard.watch(app)

    @app.agent(topic, name="projector")
    async def projector(stream: Any) -> None:
        async for batch in stream.take_events(size, within=settings.batch_within_s):
            missing: list[Any] = []
            if guard_delivery_gaps:
                missing = await _until_done(
                    "checking for undelivered records", functools.partial(guard.missing_before, batch), stats
                )
            await project_batch([*missing, *batch], client, dead_letters, stats)

    return stats
