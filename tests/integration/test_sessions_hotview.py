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
from streams.sessions import _worker
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
    one under way at a time). Every entry lands, in order; a Redis that forgot the script (a
    restart, SCRIPT FLUSH) is sent it with every chunk (EVAL) and the batch is applied whole."""
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


def _live_offsets(entries: Any) -> list[int]:
    return [int(bytes(entry[0]).split(b"-")[0]) for entry in entries]


async def test_a_script_flushed_and_loaded_again_by_another_worker_during_a_batch_loses_no_entry(
    redis_server: _Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review, twenty-first session: a chunk answered NOSCRIPT and a later chunk of the batch
    applied (another sessions process loaded the script meanwhile, after a Redis restart) made the
    whole-batch re-run add the first chunk's entries behind later ones: refused, lost for good."""
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    redis = aioredis.Redis.from_url(url, socket_timeout=5)
    other = aioredis.Redis.from_url(url, socket_timeout=5)  # another sessions process
    processor = SessionsProcessor(Settings(), redis)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    sent = 0
    send = _worker._ChunkStream.send

    async def send_then_another_loads_the_script(self: Any, chunks: list[bytes]) -> None:
        nonlocal sent
        await send(self, chunks)
        sent += len(chunks)
        if sent == len(chunks):  # after the batch's first chunk
            await other.script_load(_worker.APPLY_SCRIPT)

    try:
        await processor.on_assigned({0}, Control(end=5_000))
        await processor.process(records(tenant, "c1", 0, 10))
        await redis.script_flush()
        monkeypatch.setattr(_worker._ChunkStream, "send", send_then_another_loads_the_script)
        await processor.process(records(tenant, "c1", 10, 1_000))
        assert sent > 1
        assert _live_offsets(await redis.xrange(hv.live_stream_key(tenant, "c1"))) == list(range(1_010))
    finally:
        await redis.aclose()
        await other.aclose()


async def test_a_chunk_refused_by_redis_stops_the_batch_there_and_its_retry_writes_the_rest(
    redis_server: _Redis,
) -> None:
    """Review, twenty-first session: with every chunk sent before any reply was read, the chunks
    after a refused one (an error reply: OOM, MISCONF, a key of the wrong type) were applied, states
    included, so the batch applied again folded nothing and another conversation's live entries
    and idempotency claims in the refused chunk were never written."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    processor = SessionsProcessor(Settings(), redis)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    try:
        await processor.on_assigned({0}, Control(end=5_000))
        x = records(tenant, "x", 0, 1)
        y = [Record(r.topic, 0, r.offset + 1, r.key, r.value, 0) for r in records(tenant, "y", 0, 1)]
        await processor.process(x + y)
        # x's live stream becomes a key of another type: Redis refuses the chunk's XADD to it.
        await redis.delete(hv.live_stream_key(tenant, "x"))
        await redis.set(hv.live_stream_key(tenant, "x"), "not a stream")
        messages = [Record(r.topic, 0, r.offset + 2, r.key, r.value, 0) for r in records(tenant, "x", 1, 1)]
        messages += [
            Record(r.topic, 0, r.offset + 2, r.key, r.value, 0) for r in records(tenant, "y", 1, 397)
        ]
        with pytest.raises(Exception, match="WRONGTYPE"):
            await processor.process(messages)
        raw = await redis.hget(hv.conversation_key(tenant, "y"), hv.F_STATE)
        assert raw is not None and json.loads(raw)["event_count"] == 1, "no state past the refused chunk"
        await redis.delete(hv.live_stream_key(tenant, "x"))  # what refused it is gone
        assert await processor.process(messages) == []  # the consumer's retry
        y_entries = _live_offsets(await redis.xrange(hv.live_stream_key(tenant, "y")))
        assert y_entries == [1] + [m.offset for m in messages[1:]]
        claims = [await redis.exists(hv.idempotency_key(tenant, "y", f"m{o}")) for o in range(1, 398)]
        assert all(claims), f"{claims.count(0)} of y's claims missing"
        raw = await redis.hget(hv.conversation_key(tenant, "y"), hv.F_STATE)
        assert raw is not None and json.loads(raw)["event_count"] == 398
    finally:
        await redis.aclose()


async def test_a_connection_lost_between_a_queue_write_and_its_state_leaves_the_conversation_queued(
    redis_server: _Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review, twenty-first session: a conversation's state was written before its agents' queue
    entry; a chunk ending between them and a connection lost (a reset, a Redis crash keeping that
    prefix) left a state saying "queued" and no queue entry, and the batch applied again wrote none."""
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    redis = aioredis.Redis.from_url(url, socket_timeout=5)
    admin = aioredis.Redis.from_url(url, socket_timeout=5)
    processor = SessionsProcessor(Settings(), redis)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    finish = _worker._ChunkStream.finish

    async def connection_lost_first(self: Any, chunks: list[bytes]) -> None:
        # The chunks sent so far are applied, then the batch's connection is killed, before the
        # last chunks go out. (Killing whichever client's last command was an EVAL missed the
        # batch's connection when Redis had not yet read its EVAL: CI, twenty-fifth session.)
        if self._conn is None or not chunks:  # one chunk: nothing is sent after another
            await finish(self, chunks)
            return
        await self.wait_applied()
        await self._conn.send_command("CLIENT", "ID")
        killed = await admin.client_kill_filter(_id=await self._conn.read_response())
        assert killed == 1, killed
        await finish(self, chunks)

    try:
        await processor.on_assigned({0}, Control(end=50_000))
        # The chunk ends before, between and after this conversation's queue, activity and state
        # writes: 127 messages (a live entry and a claim each) and a handoff are 255 operations,
        # then its queue, activity and state are the 256th, 257th and 258th.
        cut: list[int] = []
        for n, size in enumerate((255, 256, 257, 258)):
            conversation, base = f"a{n}", 1_000 * n

            def rec(offset: int, conversation: str = conversation, ago_s: int = 0, **payload: Any) -> Record:
                event = new_event(tenant, conversation, **payload)
                event.occurred_at.FromSeconds(event.occurred_at.seconds - ago_s)
                return Record(TOPIC, 0, offset, conversation.encode(), encode_event(event), 0)

            # Started more than an activity step (hv.ACTIVITY_STEP_MS) before the batch, so the
            # batch always moves the activity index (whether it did depended on the clock: CI).
            started = rec(base, ago_s=6, conversation_started=events_pb2.ConversationStarted())
            await processor.process([started])
            batch = [
                rec(
                    base + o,
                    message_received=events_pb2.MessageReceived(client_message_id=f"m{o}", text="hi"),
                )
                for o in range(1, 128)
            ]
            batch.append(
                rec(base + 128, handoff_requested=events_pb2.HandoffRequested(reason="r", queue="q"))
            )
            monkeypatch.setattr(_worker, "CHUNK_OPERATIONS", size)
            monkeypatch.setattr(_worker._ChunkStream, "finish", connection_lost_first)
            try:
                await processor.process(batch)
            except Exception as exc:  # the connection was lost before the last chunk
                assert "onnection" in str(exc), exc
                cut.append(size)
            monkeypatch.setattr(_worker._ChunkStream, "finish", finish)
            await processor.process(batch)  # the consumer's retry (an outage)
            raw = await redis.hget(hv.conversation_key(tenant, conversation), hv.F_STATE)
            assert raw is not None and json.loads(raw)["queue"] == "q"
            assert await redis.zscore(hv.queue_key(tenant, "q"), conversation) is not None, (
                f"chunks of {size}"
            )
        assert cut == [255, 256, 257], cut  # (in chunks of 258 the batch is one chunk)
    finally:
        await redis.aclose()
        await admin.aclose()


def _message(tenant: str, conversation: str, offset: int) -> Record:
    event = new_event(
        tenant,
        conversation,
        message_received=events_pb2.MessageReceived(client_message_id=f"m{offset}", text="hi"),
    )
    return Record(TOPIC, 0, offset, conversation.encode(), encode_event(event), 0)


async def _with_a_refused_conversation(redis: aioredis.Redis, tenant: str) -> tuple[SessionsProcessor, Any]:
    """A worker whose conversation x has a live stream Redis refuses to add to (a key of another
    type: refused for good), beside a conversation y; and a consumer around it."""
    from streams._consumer import BatchConsumer

    processor = SessionsProcessor(Settings(), redis)
    await processor.on_assigned({0}, Control(end=5_000))
    started = [
        Record(
            TOPIC,
            0,
            n,
            c.encode(),
            encode_event(new_event(tenant, c, conversation_started=events_pb2.ConversationStarted())),
            0,
        )
        for n, c in enumerate(("x", "y"))
    ]
    await processor.process(started)
    await redis.delete(hv.live_stream_key(tenant, "x"))
    await redis.set(hv.live_stream_key(tenant, "x"), "not a stream")
    consumer = BatchConsumer(Settings(), processor, topic=TOPIC, group_id="g", batch_size=500)
    return processor, consumer


async def test_a_record_that_fails_alone_is_dead_lettered_before_the_position_passes_it(
    redis_server: _Redis,
) -> None:
    """Review, twenty-first session: the consumer isolating a failing record applied the parts after
    it (the sessions worker wrote its Redis position past it) and dead-lettered it only at the end;
    the worker resumes from that position, so a crash in between lost the dead letter."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    try:
        _, consumer = await _with_a_refused_conversation(redis, tenant)
        seen: list[tuple[int, int]] = []

        async def dead_letter(record: Record, exc: BaseException) -> None:
            seen.append((record.offset, int(await redis.hget(hv.APPLIED_KEY, "0") or 0)))

        consumer._dead_letter = dead_letter
        batch = [_message(tenant, "y", 2), _message(tenant, "x", 3)] + [
            _message(tenant, "y", o) for o in range(4, 40)
        ]
        assert await consumer._apply_until_done(batch) is True
        assert [offset for offset, _ in seen] == [3]
        assert seen[0][1] <= 3, f"the position was {seen[0][1]} when offset 3 was dead-lettered"
        assert await redis.hget(hv.APPLIED_KEY, "0") == b"40"
    finally:
        await redis.aclose()


async def test_a_batch_that_redis_refuses_dead_letters_its_undecodable_record_once(
    redis_server: _Redis,
) -> None:
    """Review, twenty-first session: the worker dead-lettered a batch's refused records before it
    read whether Redis had applied the batch's writes, so a batch that Redis refused dead-lettered
    them again on every attempt."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    try:
        processor, consumer = await _with_a_refused_conversation(redis, tenant)
        dead: list[int] = []

        async def dead_letter(record: Record, exc: BaseException) -> None:
            dead.append(record.offset)

        consumer._dead_letter = dead_letter
        processor.bind_dead_letter(consumer._dead_letter_all)
        undecodable = Record(TOPIC, 0, 3, b"z", b"not an event", 0)
        batch = [_message(tenant, "x", 2), undecodable] + [_message(tenant, "y", o) for o in range(4, 12)]
        assert await consumer._apply_until_done(batch) is True
        assert sorted(dead) == [2, 3], dead  # x's message (refused alone) and the undecodable one, once each
    finally:
        await redis.aclose()


async def test_the_claims_the_worker_rebuilds_carry_the_digest_of_each_text(redis_server: _Redis) -> None:
    """After a Redis loss the worker writes the claims again from the log; a retry with another
    text under a rebuilt claim must be refused as under the ingress's own (ALREADY_EXISTS)."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    processor = SessionsProcessor(Settings(), redis)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    try:
        await processor.on_assigned({0}, Control(end=0))
        started = new_event(tenant, "d", conversation_started=events_pb2.ConversationStarted())
        said = new_event(
            tenant, "d", message_received=events_pb2.MessageReceived(client_message_id="k", text="退款")
        )
        await processor.process(
            [Record(TOPIC, 0, o, b"d", encode_event(e), 0) for o, e in ((0, started), (1, said))]
        )
        raw: bytes | None = await redis.get(hv.idempotency_key(tenant, "d", "k"))  # type: ignore[assignment]
        assert raw is not None
        assert raw.decode() == hv.encode_claim(said.event_id, 0, 1, hv.claim_digest("退款"))
    finally:
        await redis.aclose()


async def test_the_state_written_after_an_event_the_fold_passes_over_is_a_replays(
    redis_server: _Redis,
) -> None:
    """Seen in the twenty-ninth session's trial: `replay --target sessions --no-swap` said "identical:
    NO" on a healthy system. The bot's reply to a message of the close's last instant lands after the
    close; the fold passes over it (not counted) and advances its position, and a replay's state says
    so, but the live worker wrote only states that an applied event changed: Redis kept the close's
    position (cursor 88-1 against the replay's 101-1)."""
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/0", socket_timeout=5)
    processor = SessionsProcessor(Settings(), redis)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    events = [
        new_event(tenant, "d", conversation_started=events_pb2.ConversationStarted()),
        new_event(tenant, "d", message_received=events_pb2.MessageReceived(client_message_id="k", text="hi")),
        new_event(tenant, "d", conversation_closed=events_pb2.ConversationClosed(resolution="done")),
        new_event(tenant, "d", reply_generated=events_pb2.ReplyGenerated(text="too late")),
    ]
    try:
        await processor.on_assigned({0}, Control(end=0))
        await processor.process(
            [Record(TOPIC, 0, o, b"d", encode_event(e), 0) for o, e in enumerate(events[:3])]
        )
        key = hv.conversation_key(tenant, "d")
        assert await redis.hget(key, hv.F_CURSOR) == hv.live_stream_id(2).encode()
        await processor.process([Record(TOPIC, 0, 3, b"d", encode_event(events[3]), 0)])
        assert await redis.hget(key, hv.F_CURSOR) == hv.live_stream_id(3).encode()
        state = json.loads(await redis.hget(key, hv.F_STATE))  # type: ignore[arg-type]
        assert state["last_event_id"] == events[3].event_id and state["message_count"] == 1
    finally:
        await redis.aclose()
