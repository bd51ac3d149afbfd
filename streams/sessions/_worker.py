"""The sessions worker: folds conversation events into conversation state, kept in Redis.

Redis holds the hot view: per conversation a hash with the state (JSON of `ConversationState`)
and a live stream; per client message its idempotency claim. The worker keeps its own position
next to them (`hv.APPLIED_KEY`: partition -> next offset), written in the same pipeline as, and
after, the states of a batch, so a Redis that kept the position kept everything before it.

Per batch, in this order: read the states of the batch's conversations and the positions; fold
every event (pure); write live-stream entries, claims, states and positions in one pipeline;
then the consumer commits the offsets to Kafka. Every step is idempotent: the fold skips what a
state already has, a live-stream entry id comes from the offset (Redis refuses it twice), claims
and states are overwritten with the same values.

Redis losing data is noticed by the position: a partition the worker has written a position for
whose position is gone is rebuilt from the start of the log (states, live streams and claims),
and `hv.READY_KEY` (which the ingress requires before it accepts writes) is set for a partition
only once the rebuild reached the log end seen when it began.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from schemas import hotview as hv
from schemas.events import Event, EventDecodeError, LogPosition, decode_event, event_type
from services.settings import Settings
from streams._consumer import (
    BatchConsumer,
    PartitionControl,
    Record,
    Rejected,
    instance_id,
    is_outage,
    run_until_signalled,
)
from streams.sessions._state import STATUS_CLOSED, ConversationState, fold_event

log = logging.getLogger(__name__)

# How often an idle worker checks that Redis still has its positions (a Redis that restarted
# empty with no traffic arriving is noticed within this).
IDLE_CHECK_S = 1.0


@dataclass
class _Rebuild:
    # The log end when the rebuild began: the partition is ready once applied up to it.
    until: int


class SessionsProcessor:
    name = "sessions"

    def __init__(self, settings: Settings, redis: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = redis
        self._ttl_ms = settings.idempotency_ttl_s * 1000
        # Partitions this worker owns, with the position it last wrote (None: not yet).
        self._owned: dict[int, int | None] = {}
        self._rebuilding: dict[int, _Rebuild] = {}
        self._control: PartitionControl | None = None
        self._last_idle_check = 0.0
        self.rebuilds = 0

    # --- assignment ----------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        self._control = consumer
        delay = 0.2
        while True:
            try:
                return await self._take(partitions, consumer)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                log.error("taking partitions %s: %r; retrying in %.1fs", sorted(partitions), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _take(self, partitions: set[int], consumer: PartitionControl) -> None:
        if not partitions:
            return
        positions = await self._positions(partitions)
        ends = await consumer.end_offsets(partitions)
        ready: list[int] = []
        for p in sorted(partitions):
            position = positions.get(p)
            if position is not None:
                consumer.seek(p, position)
                self._owned[p] = position
                ready.append(p)
            else:
                await self._start_rebuild(p, ends.get(p, 0), consumer, why="Redis has no position for it")
        if ready:
            await self._redis.hset(hv.READY_KEY, mapping={str(p): "1" for p in ready})

    async def on_revoked(self, partitions: set[int]) -> None:
        for p in partitions:
            self._owned.pop(p, None)
            self._rebuilding.pop(p, None)

    async def _start_rebuild(
        self, partition: int, until: int, consumer: PartitionControl, *, why: str
    ) -> None:
        await consumer.seek_to_beginning(partition)
        self._owned[partition] = None
        if until > 0:
            self.rebuilds += 1
            log.warning(
                "partition %d: %s; rebuilding its hot view from the start of the log (up to offset %d)",
                partition,
                why,
                until,
            )
            self._rebuilding[partition] = _Rebuild(until)
            await self._redis.hdel(hv.READY_KEY, str(partition))
        else:
            # Nothing written to it yet: nothing to rebuild.
            self._rebuilding.pop(partition, None)
            await self._redis.hset(hv.READY_KEY, str(partition), "1")

    async def _positions(self, partitions: set[int]) -> dict[int, int]:
        fields = [str(p) for p in sorted(partitions)]
        values = await self._redis.hmget(hv.APPLIED_KEY, fields)
        return {int(f): int(v) for f, v in zip(fields, values, strict=True) if v is not None}

    async def idle(self, consumer: PartitionControl) -> None:
        now = time.monotonic()
        if now - self._last_idle_check < IDLE_CHECK_S:
            return
        self._last_idle_check = now
        await self._check_lost(set(self._owned), consumer)

    async def healthy(self) -> bool:
        return bool(await self._redis.ping())

    async def _check_lost(self, partitions: set[int], consumer: PartitionControl) -> set[int]:
        """Partitions whose position this worker wrote but Redis no longer has: Redis lost data.
        Each is rebuilt from the start of the log; returns them."""
        written = {p for p in partitions if self._owned.get(p) is not None}
        if not written:
            return set()
        positions = await self._positions(written)
        lost = {p for p in written if p not in positions}
        if lost:
            ends = await consumer.end_offsets(lost)
            for p in sorted(lost):
                await self._start_rebuild(p, ends.get(p, 0), consumer, why="Redis lost its position")
        return lost

    # --- one batch -----------------------------------------------------------------------------

    async def process(self, records: Sequence[Record]) -> Rejected:
        if self._control is not None:
            lost = await self._check_lost({r.partition for r in records}, self._control)
            if lost:
                # Those partitions start again from the beginning; this batch's records of them
                # come again in order.
                records = [r for r in records if r.partition not in lost]
        rejected: list[tuple[Record, BaseException]] = []
        decoded: list[tuple[Event, Record]] = []
        for r in records:
            try:
                decoded.append((decode_event(r.value), r))
            except EventDecodeError as exc:
                rejected.append((r, exc))
        await self._fold_and_write(decoded, records, rejected)
        return rejected

    async def _fold_and_write(
        self,
        decoded: list[tuple[Event, Record]],
        records: Sequence[Record],
        rejected: list[tuple[Record, BaseException]],
    ) -> None:
        slots = list(dict.fromkeys((e.tenant_id, e.conversation_id) for e, _ in decoded))
        async with self._redis.pipeline(transaction=False) as read:
            for tenant_id, conversation_id in slots:
                read.hget(hv.conversation_key(tenant_id, conversation_id), hv.F_STATE)
            stored = await read.execute() if slots else []
        states: dict[tuple[str, str], ConversationState | None] = {
            slot: ConversationState.from_json(json.loads(raw)) if raw else None
            for slot, raw in zip(slots, stored, strict=True)
        }
        changed: dict[tuple[str, str], ConversationState] = {}
        pipe = self._redis.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        for event, record in decoded:
            slot = (event.tenant_id, event.conversation_id)
            position = LogPosition(record.partition, record.offset)
            before = states[slot]
            try:
                result = fold_event(before, event, position)
            except Exception as exc:  # a pure step: this record fails every time
                rejected.append((record, exc))
                continue
            states[slot] = result.state
            _requeue(pipe, before, result.state)
            if not result.applied:
                continue
            changed[slot] = result.state
            fields: dict[Any, Any] = {
                hv.S_EVENT: record.value,
                hv.S_STATUS: result.state.status,
                hv.S_MESSAGES: result.state.message_count,
            }
            if result.message_sequence:
                fields[hv.S_SEQUENCE] = result.message_sequence
            pipe.xadd(
                hv.live_stream_key(*slot),
                fields,
                id=position.cursor,
                maxlen=self._settings.live_stream_maxlen,
                approximate=True,
            )
            claim = _claim_of(event)
            if claim:
                expires_ms = event.occurred_at.ToMilliseconds() + self._ttl_ms
                if expires_ms > now_ms:
                    pipe.set(
                        hv.idempotency_key(*slot, claim),
                        hv.encode_claim(event.event_id, position.partition, position.offset),
                        pxat=expires_ms,
                    )
        for slot, state in changed.items():
            pipe.hset(hv.conversation_key(*slot), mapping=_mirror_fields(state))
        # Positions last: a Redis that kept them kept everything above.
        last: dict[int, int] = {}
        for r in records:
            last[r.partition] = max(last.get(r.partition, -1), r.offset)
        if last:
            pipe.hset(hv.APPLIED_KEY, mapping={str(p): o + 1 for p, o in last.items()})
        now_ready = [
            p for p, o in last.items() if p in self._rebuilding and o + 1 >= self._rebuilding[p].until
        ]
        if now_ready:
            pipe.hset(hv.READY_KEY, mapping={str(p): "1" for p in now_ready})
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            # A redelivered event's entry is already there: Redis refuses the repeated id.
            if isinstance(reply, ResponseError) and "equal or smaller" not in str(reply):
                raise reply
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply
        for p, o in last.items():
            self._owned[p] = o + 1
        for p in now_ready:
            self._rebuilding.pop(p, None)
            log.info("partition %d: hot view rebuilt up to offset %d; accepting writes again", p, last[p])


def _requeue(pipe: Any, before: ConversationState | None, after: ConversationState) -> None:
    """Keep the agents' queues (sorted sets, oldest handoff first) in step with the states."""
    was = before.queue if before is not None and before.status != STATUS_CLOSED else ""
    now = after.queue if after.status != STATUS_CLOSED else ""
    if was and was != now:
        pipe.zrem(hv.queue_key(after.tenant_id, was), after.conversation_id)
    if now and (now != was or before is None or before.handoff_at_ns != after.handoff_at_ns):
        pipe.zadd(hv.queue_key(after.tenant_id, now), {after.conversation_id: after.handoff_at_ns})


def _claim_of(event: Event) -> str:
    """The idempotency claim an event settles (what a retry of its write must find)."""
    kind = event_type(event)
    if kind == "message_received":
        return str(event.message_received.client_message_id)
    if kind == "agent_message_sent":
        return str(event.agent_message_sent.client_message_id)
    if kind == "conversation_started":
        return hv.START_CLAIM
    if kind == "conversation_closed":
        return hv.CLOSE_CLAIM
    return ""


def _mirror_fields(state: ConversationState) -> dict[Any, Any]:
    mirror: dict[Any, Any] = {
        hv.F_STATE: json.dumps(state.to_json(), ensure_ascii=False),
        hv.F_CURSOR: LogPosition(state.last_partition, state.last_offset).cursor,
    }
    if state.status == STATUS_CLOSED:
        mirror[hv.F_CLOSED_NS] = state.closed_at_ns
    if state.created_at_ns:
        mirror[hv.F_CREATED_NS] = state.created_at_ns
        mirror[hv.F_CHANNEL] = state.channel
        mirror[hv.F_CUSTOMER] = state.customer_id
    return mirror


def sessions_consumer(settings: Settings, redis: aioredis.Redis) -> tuple[BatchConsumer, SessionsProcessor]:
    processor = SessionsProcessor(settings, redis)
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id="switchboard-sessions",
        batch_size=settings.batch_size,
        instance_id=instance_id(settings, "sessions"),
    )
    return consumer, processor


async def serve_sessions(settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=5)
    consumer, _ = sessions_consumer(settings, redis)
    await run_until_signalled(consumer, redis.aclose)


def run_sessions(settings: Settings, loglevel: str = "info") -> None:
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve_sessions(settings))


__all__ = ["SessionsProcessor", "run_sessions", "serve_sessions", "sessions_consumer"]
