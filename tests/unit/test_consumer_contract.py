"""The delivery contract of `streams._consumer.BatchConsumer`, without a broker: what a batch
does when the processor fails for good, fails for a while, or fails because of one record."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import redis.exceptions
from aiokafka import TopicPartition
from switchboard.v1 import events_pb2 as pb

from schemas.events import encode_event, new_event
from services.settings import Settings
from streams import _consumer
from streams._consumer import BatchConsumer, Record, Rejected
from streams.projector import COLUMNS, ProjectorProcessor
from streams.projector._rows import MESSAGES


def record(offset: int, value: bytes = b"v", partition: int = 0) -> Record:
    return Record("conversation-events", partition, offset, b"k", value, 0)


class ScriptedProcessor:
    """Applies records unless told to fail: `poison` offsets fail every time they are in a
    batch, `outages` makes the next N calls fail with a connection error."""

    name = "scripted"

    def __init__(self, poison: set[int] = frozenset(), outages: int = 0, healthy: bool = True) -> None:  # type: ignore[assignment]
        self.poison = set(poison)
        self.outages = outages
        self.is_healthy = healthy
        self.applied: list[int] = []
        self.calls = 0
        self.called = asyncio.Event()

    async def on_assigned(self, partitions: set[int], consumer: Any) -> None: ...

    async def on_revoked(self, partitions: set[int]) -> None: ...

    async def idle(self, consumer: Any) -> None: ...

    async def healthy(self) -> bool:
        return self.is_healthy

    async def process(self, records: Sequence[Record]) -> Rejected:
        self.calls += 1
        self.called.set()
        if self.outages:
            self.outages -= 1
            raise redis.exceptions.ConnectionError("redis is down")
        bad = [r.offset for r in records if r.offset in self.poison]
        if bad:
            raise KeyError(f"tenant_id (offset {bad[0]})")
        self.applied.extend(r.offset for r in records)
        return []


class DeadLetters:
    def __init__(self) -> None:
        self.sent: list[tuple[Record, str]] = []

    async def __call__(self, record: Record, exc: BaseException) -> None:
        self.sent.append((record, repr(exc)))


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_consumer, "RETRY_INITIAL_S", 0.001)
    monkeypatch.setattr(_consumer, "RETRY_MAX_S", 0.002)
    monkeypatch.setattr(_consumer, "OUTAGE_RETRY_MAX_S", 0.002)


def runner(processor: Any) -> tuple[BatchConsumer, DeadLetters]:
    consumer = BatchConsumer(Settings(), processor, topic="conversation-events", group_id="g", batch_size=10)
    dead = DeadLetters()
    consumer._dead_letter = dead  # type: ignore[method-assign]
    return consumer, dead


async def test_a_poison_record_is_dead_lettered_and_the_rest_applied_in_order() -> None:
    processor = ScriptedProcessor(poison={13})
    consumer, dead = runner(processor)
    batch = [record(o) for o in range(10, 20)]
    assert await consumer._apply(batch) is True
    assert [r.offset for r, _ in dead.sent] == [13]
    assert "tenant_id" in dead.sent[0][1]
    # Everything else, each once at least, and in offset order the first time it was applied.
    first_seen = list(dict.fromkeys(processor.applied))
    assert first_seen == [o for o in range(10, 20) if o != 13]


async def test_two_poison_records_in_one_batch_are_both_isolated() -> None:
    processor = ScriptedProcessor(poison={10, 19})
    consumer, dead = runner(processor)
    assert await consumer._apply([record(o) for o in range(10, 20)]) is True
    assert sorted(r.offset for r, _ in dead.sent) == [10, 19]
    assert set(processor.applied) == set(range(11, 19))


async def test_an_outage_is_retried_and_never_dead_lettered() -> None:
    processor = ScriptedProcessor(outages=12)
    consumer, dead = runner(processor)
    assert await consumer._apply([record(1), record(2)]) is True
    assert not dead.sent and processor.applied == [1, 2] and processor.calls == 13


async def test_a_batch_failing_everywhere_with_an_unhealthy_sink_is_not_dead_lettered() -> None:
    processor = ScriptedProcessor(poison={1, 2, 3}, healthy=False)
    consumer, dead = runner(processor)
    task = asyncio.create_task(consumer._apply([record(1), record(2), record(3)]))
    while processor.calls < 20:
        processor.called.clear()
        await processor.called.wait()
    assert not dead.sent, "a sink failing for every record must not dead-letter the data"
    processor.is_healthy = True
    assert await task is True
    assert sorted(r.offset for r, _ in dead.sent) == [1, 2, 3]


async def test_stopping_during_an_outage_leaves_the_batch_unfinished() -> None:
    processor = ScriptedProcessor(outages=10**6)
    consumer, dead = runner(processor)
    task = asyncio.create_task(consumer._apply([record(1)]))
    while processor.calls < 3:
        processor.called.clear()
        await processor.called.wait()
    await consumer.stop()
    assert await task is False
    assert not processor.applied and not dead.sent


async def test_rejected_records_from_a_pure_step_are_dead_lettered_without_retries() -> None:
    class Refusing(ScriptedProcessor):
        async def process(self, records: Sequence[Record]) -> Rejected:
            self.calls += 1
            return [(r, ValueError("undecodable")) for r in records if r.value == b"bad"]

    processor = Refusing()
    consumer, dead = runner(processor)
    assert await consumer._apply([record(1), record(2, b"bad"), record(3)]) is True
    assert processor.calls == 1 and [r.offset for r, _ in dead.sent] == [2]


# --- the projector on this contract ------------------------------------------------------------


class FakeInsertContext:
    def __init__(self, table: str, column_names: list[str], database: str, column_oriented: bool) -> None:
        self.table, self.column_names, self.database = table, column_names, database
        self.column_oriented = column_oriented
        self.data: list[Any] | None = None


class RecordingClient:
    """clickhouse-connect's insert-context API, recording what was inserted."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, list[Any]]] = []

    def create_insert_context(
        self, table: str, column_names: list[str], database: str, column_oriented: bool = False
    ) -> FakeInsertContext:
        return FakeInsertContext(table, column_names, database, column_oriented)

    def insert(self, context: FakeInsertContext) -> None:
        data = list(context.data or ())
        if context.column_oriented:
            assert len(data) == len(context.column_names)
            data = [list(row) for row in zip(*data, strict=True)]
        self.inserts.append((context.table, data))


def message_event(text: str) -> bytes:
    return encode_event(new_event("acme", "c1", message_received=pb.MessageReceived(text=text)))


async def test_projector_hands_back_garbage_and_projects_the_rest_with_positions() -> None:
    client = RecordingClient()
    processor = ProjectorProcessor(client)
    rejected = await processor.process(
        [
            record(10, message_event("a"), 1),
            record(11, b"\xff\x00garbage", 1),
            record(12, message_event("b"), 1),
        ]
    )
    assert [r.offset for r, _ in rejected] == [11]
    table = MESSAGES if MESSAGES in COLUMNS else "messages"
    messages = next(rows for name, rows in client.inserts if name == table)
    cols = COLUMNS[table]
    assert [(r[cols.index("partition")], r[cols.index("offset")]) for r in messages] == [(1, 10), (1, 12)]


# --- batches by size and age ---------------------------------------------------------------------


class PollingKafka:
    """aiokafka's getmany, answering from a script of polls (then nothing)."""

    def __init__(self, polls: list[list[int]]) -> None:
        self.polls = list(polls)
        self.max_records: list[int] = []

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        from types import SimpleNamespace

        self.max_records.append(max_records)
        if not self.polls:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        offsets = self.polls.pop(0)[:max_records]
        tp = TopicPartition("conversation-events", 0)
        return {
            tp: [SimpleNamespace(offset=o, key=b"k", value=b"v", timestamp=0, headers=()) for o in offsets]
        }


async def test_a_lingering_consumer_fills_its_batch_from_later_polls_in_order() -> None:
    consumer = BatchConsumer(
        Settings(), ScriptedProcessor(), topic="conversation-events", group_id="g", batch_size=5, linger_s=5.0
    )
    kafka = PollingKafka([[3, 4], [], [5, 6, 7, 8]])
    consumer._consumer = kafka
    batch = await consumer._linger([record(1), record(2)])
    # Full at five records: no waiting for the linger time, and never more than the batch size.
    assert [r.offset for r in batch] == [1, 2, 3, 4, 5]
    assert kafka.max_records == [3, 1, 1]


async def test_a_lingering_consumer_hands_over_a_partial_batch_once_the_linger_time_is_up() -> None:
    consumer = BatchConsumer(
        Settings(),
        ScriptedProcessor(),
        topic="conversation-events",
        group_id="g",
        batch_size=100,
        linger_s=0.05,
    )
    consumer._consumer = PollingKafka([[2]])
    batch = await asyncio.wait_for(consumer._linger([record(1)]), 5)
    assert [r.offset for r in batch] == [1, 2]
