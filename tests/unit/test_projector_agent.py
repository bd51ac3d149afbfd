"""The projector agent's batch step with fake Faust events, a fake sink and a fake dead-letter topic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from switchboard.v1 import events_pb2 as pb

from schemas.events import encode_event, new_event
from streams.projector import COLUMNS, ProjectorStats, project_batch
from streams.projector import _agent as agent_module


@dataclass
class FakeMessage:
    topic: str
    partition: int
    offset: int
    key: bytes = b"k"


@dataclass
class FakeEvent:
    value: bytes
    message: FakeMessage


@dataclass
class FakeInsertContext:
    table: str
    column_names: list[str]
    database: str
    data: Any = None


@dataclass(eq=False)
class FakeClient:
    """clickhouse-connect's insert-context API, recording what was inserted."""

    fail_times: int = 0
    inserts: list[tuple[str, list[list[Any]], list[str]]] = field(default_factory=list)

    def create_insert_context(self, table: str, column_names: list[str], database: str) -> FakeInsertContext:
        return FakeInsertContext(table, column_names, database)

    def insert(self, context: FakeInsertContext) -> None:
        assert context.database == "switchboard"
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("clickhouse is down")
        self.inserts.append((context.table, list(context.data), context.column_names))


@dataclass
class FakeTopic:
    sent: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, **kwargs: Any) -> asyncio.Future[None]:
        self.sent.append(kwargs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def batch_of(*values: bytes) -> list[FakeEvent]:
    return [FakeEvent(v, FakeMessage("conversation-events", 1, 10 + i)) for i, v in enumerate(values)]


def message_event(text: str) -> bytes:
    return encode_event(new_event("acme", "c1", message_received=pb.MessageReceived(text=text)))


async def test_batch_is_projected_with_log_positions() -> None:
    client, dlq, stats = FakeClient(), FakeTopic(), ProjectorStats()
    await project_batch(batch_of(message_event("a"), message_event("b")), client, dlq, stats)
    tables = {table: (rows, cols) for table, rows, cols in client.inserts}
    rows, cols = tables["messages"]
    assert [(r[cols.index("partition")], r[cols.index("offset")]) for r in rows] == [(1, 10), (1, 11)]
    assert tables["events"][0] and stats.events == 2 and stats.batches == 1
    assert not dlq.sent


async def test_undecodable_record_is_dead_lettered_and_the_rest_projected(caplog: Any) -> None:
    client, dlq, stats = FakeClient(), FakeTopic(), ProjectorStats()
    await project_batch(batch_of(b"\xff\x00garbage", message_event("ok")), client, dlq, stats)
    assert stats.dead_lettered == 1 and stats.events == 1
    (sent,) = dlq.sent
    headers = dict(sent["headers"])
    assert headers["sb-dlq-source"] == b"conversation-events/1/10"
    assert headers["sb-dlq-processor"] == b"projector"
    assert headers["sb-dlq-reason"]
    assert sent["value"] == b"\xff\x00garbage"
    assert "conversation-events/1/10" in caplog.text


async def test_failed_insert_is_retried_not_acked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "RETRY_INITIAL_S", 0.001)
    client, dlq, stats = FakeClient(fail_times=2), FakeTopic(), ProjectorStats()
    await project_batch(batch_of(message_event("a")), client, dlq, stats)
    # The body only returns (and take_events only acks) once the rows are in.
    assert stats.failures == 2 and stats.batches == 1
    assert {t for t, _, _ in client.inserts} >= {"events", "messages"}


async def test_batch_of_only_garbage_inserts_nothing() -> None:
    client, dlq, stats = FakeClient(), FakeTopic(), ProjectorStats()
    await project_batch(batch_of(b""), client, dlq, stats)
    assert not client.inserts and stats.dead_lettered == 1


async def test_cancelled_worker_waits_for_the_insert_in_flight() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    client = FakeClient()
    original = client.insert

    def slow_insert(context: FakeInsertContext) -> None:
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        original(context)

    client.insert = slow_insert  # type: ignore[method-assign]
    task = asyncio.create_task(
        project_batch(batch_of(message_event("a")), client, FakeTopic(), ProjectorStats())
    )
    await started.wait()
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done(), "the agent unwound (and Faust would ack) before the insert finished"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {t for t, _, _ in client.inserts} >= {"events", "messages"}


async def test_registered_agent_projects_batches_from_its_stream(tmp_path: Any) -> None:
    """The real Faust agent (take_events and all) on Faust's in-memory test channel."""
    from services.settings import Settings
    from streams.app import create_app
    from streams.projector import register_projector

    settings = Settings(data_dir=tmp_path, batch_within_s=0.02)
    app = create_app("projector", settings)
    client = FakeClient()
    stats = register_projector(app, settings, client, batch_size=2, guard_delivery_gaps=False)
    (agent,) = app.agents.values()
    async with agent.test_context() as test_agent:
        for i in range(3):
            await test_agent.put(message_event(f"m{i}"), key=b"c1")
        for _ in range(100):
            if stats.events >= 3:
                break
            await asyncio.sleep(0.02)
    assert stats.events == 3 and stats.batches == 2  # batches of at most 2
    messages = [rows for table, rows, _ in client.inserts if table == "messages"]
    offsets = [row[COLUMNS["messages"].index("offset")] for rows in messages for row in rows]
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
