"""The sessions worker's processor on a real Redis (the stack's), driven batch by batch: what it
keeps in memory never hides what Redis lost."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
import redis.asyncio as aioredis
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import encode_event, new_event
from services.settings import Settings
from streams._consumer import Record
from streams.sessions._worker import SessionsProcessor
from tests.integration.test_tick_pipeline import _Redis, redis_server

__all__ = ["redis_server"]  # a fixture of this module's tests too

pytestmark = pytest.mark.integration

TOPIC = "conversation-events"


class Control:
    """The consumer's side of a partition, as the processor sees it (no broker needed here)."""

    def __init__(self, end: int) -> None:
        self.end = end
        self.rewound: list[int] = []

    def seek(self, partition: int, offset: int) -> None: ...

    async def seek_to_beginning(self, partition: int) -> None:
        self.rewound.append(partition)

    async def committed(self, partition: int) -> int | None:
        return None

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        return dict.fromkeys(partitions, self.end)

    def assigned(self) -> set[int]:
        return {0}


def records(tenant: str, conversation: str, start: int, count: int) -> list[Record]:
    out = []
    for offset in range(start, start + count):
        if offset == 0:
            event = new_event(tenant, conversation, conversation_started=events_pb2.ConversationStarted())
        else:
            event = new_event(
                tenant,
                conversation,
                message_received=events_pb2.MessageReceived(client_message_id=f"m{offset}", text="hi"),
            )
        out.append(Record(TOPIC, 0, offset, conversation.encode(), encode_event(event), 0))
    return out


async def test_a_redis_that_loses_everything_during_a_batch_is_still_rebuilt(local_stack: Settings) -> None:
    # A logical database of its own: the processes of the session's system use db 0.
    redis = aioredis.Redis.from_url(local_stack.redis_url.rsplit("/", 1)[0] + "/9")
    await redis.flushdb()
    tenant, conversation = f"t{uuid.uuid4().hex[:8]}", "c1"
    processor = SessionsProcessor(local_stack, redis)
    control = Control(end=10)
    try:
        await processor.on_assigned({0}, control)
        assert control.rewound == [0]  # nothing in Redis yet: from the start of the log
        control.rewound.clear()
        await processor.process(records(tenant, conversation, 0, 5))
        assert await redis.hget(hv.APPLIED_KEY, "0") == b"5"

        # Redis loses everything after the batch's check (simulated by skipping the check) and
        # before its writes: the states of this batch land, but the position must not, or the
        # loss of everything before it would go unnoticed.
        await redis.flushdb()
        rejected: list[tuple[Record, BaseException]] = []
        batch = records(tenant, conversation, 5, 3)
        await processor._fold_and_write(processor_decoded(batch), batch, rejected)
        assert not rejected
        assert await redis.hget(hv.APPLIED_KEY, "0") is None

        # The next batch's check notices and rebuilds the partition from the start of the log.
        assert await processor.process(records(tenant, conversation, 8, 2)) == []
        assert control.rewound == [0]
        assert await redis.hget(hv.READY_KEY, "0") is None
        # The log again from the start: the state is whole, the partition ready once at the end.
        for start in range(0, 10, 4):
            await processor.process(records(tenant, conversation, start, min(4, 10 - start)))
        raw = await redis.hget(hv.conversation_key(tenant, conversation), hv.F_STATE)
        assert raw is not None
        state = json.loads(raw)
        assert state["message_count"] == 9 and state["event_count"] == 10
        assert await redis.hget(hv.READY_KEY, "0") == b"1"
        assert await redis.xlen(hv.live_stream_key(tenant, conversation)) == 10
    finally:
        await redis.flushdb()
        await redis.aclose()


def processor_decoded(batch: list[Record]) -> list[tuple[events_pb2.Event, Record]]:
    from schemas.events import decode_event

    return [(decode_event(r.value), r) for r in batch]


async def test_an_idle_worker_outlives_a_redis_that_is_down() -> None:
    """The soak's Redis kill -9 once ended the worker: its idle check of the positions raised."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=1)
    processor = SessionsProcessor(Settings(), down)
    processor._owned = {0: 5}  # a partition whose position it wrote
    try:
        await processor.idle(Control(end=10))  # logs and returns; the next idle poll checks again
    finally:
        await down.aclose()


async def test_a_batch_of_many_chunks_lands_whole_and_in_order_also_after_redis_forgot_the_script(
    redis_server: _Redis,
) -> None:
    """A batch's chunks go to Redis as they are sealed, while the rest is folded (one connection,
    replies read at the end). Every entry lands, in order; a Redis that forgot the script (a
    restart, SCRIPT FLUSH) gets it again and the batch is applied whole."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    processor = SessionsProcessor(Settings(), redis)
    control = Control(end=2_000)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    try:
        await processor.on_assigned({0}, control)
        # One conversation, 1,000 events in one batch: live entries and claims in ~8 chunks.
        await processor.process(records(tenant, "c1", 0, 1_000))
        await redis.script_flush()
        await processor.process(records(tenant, "c1", 1_000, 1_000))
        entries: Any = await redis.xrange(hv.live_stream_key(tenant, "c1"))
        assert [int(bytes(entry[0]).split(b"-")[0]) for entry in entries] == list(range(2_000))
        raw = await redis.hget(hv.conversation_key(tenant, "c1"), hv.F_STATE)
        assert raw is not None
        assert json.loads(raw)["event_count"] == 2_000
        assert await redis.hget(hv.APPLIED_KEY, "0") == b"2000"
        assert await redis.exists(hv.idempotency_key(tenant, "c1", "m1999")) == 1
        # Every connection went back to the pool with no reply left unread.
        assert await redis.ping()
    finally:
        await redis.aclose()
