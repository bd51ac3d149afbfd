"""The sessions worker: folds conversation events into a Faust table and mirrors it to Redis.

Per batch, in this order: fold every event; write the Redis mirror (hash + live stream); write the
table (its changelog); then Faust acks the batch. A crash anywhere in between redelivers the batch,
and every step is idempotent: the fold skips what it has applied, the live stream refuses an entry
id it already has (ids come from offsets), and the hash is overwritten with the same state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import Any

import faust
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from schemas import hotview as hv
from schemas.events import EventDecodeError, LogPosition, decode_event
from services.settings import Settings
from streams.app import conversation_topic, create_app, run_worker
from streams.sessions._state import STATUS_CLOSED, ConversationState, fold_event

log = logging.getLogger(__name__)


def _dead_letter_headers(reason: str, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    return [
        ("sb-dlq-reason", reason.encode()[:1000]),
        ("sb-dlq-source", f"{topic}/{partition}/{offset}".encode()),
        ("sb-dlq-processor", b"sessions"),
    ]


def register_sessions(app: faust.App, settings: Settings) -> None:
    topic = conversation_topic(app, settings)
    dead_letters = app.topic(
        settings.dead_letter_topic, key_serializer="raw", value_serializer="raw", internal=False
    )
    table = app.Table(
        "conversation_state",
        default=None,
        partitions=settings.topic_partitions,
        # bytes keys are stored raw; values (state as a dict) as JSON — Faust picks the changelog
        # serializers from these types, in recovery too.
        key_type=bytes,
        # Changelog partition from the key (murmur2, like the source topic), not from the
        # "current event", which inside a batch is not the event being folded.
        use_partitioner=True,
    )
    redis_box: dict[str, aioredis.Redis] = {}

    async def redis() -> aioredis.Redis:
        if "r" not in redis_box:
            redis_box["r"] = aioredis.Redis.from_url(settings.redis_url)
        return redis_box["r"]

    @app.agent(topic, name="sessions")
    async def sessions(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            # Faust acks a batch even when this body raises, so a failure must not escape:
            # retry until the mirror is written (the fold is pure, so a retry is the same work).
            backoff = 0.1
            while True:
                try:
                    await _fold_batch(batch, table, await redis(), dead_letters, settings)
                    break
                except (RedisError, OSError) as exc:
                    log.warning("Redis mirror write failed (%r); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)


async def _fold_batch(
    batch: Sequence[Any], table: Any, redis: aioredis.Redis, dead_letters: Any, settings: Settings
) -> None:
    states: dict[bytes, ConversationState | None] = {}
    changed: dict[bytes, ConversationState] = {}
    pipe = redis.pipeline(transaction=False)
    appended = 0
    for item in batch:
        msg = item.message
        try:
            event = decode_event(item.value)
        except EventDecodeError as exc:
            log.error("dead-lettering %s/%s/%s: %s", msg.topic, msg.partition, msg.offset, exc)
            await dead_letters.send(
                key=msg.key,
                value=item.value,
                headers=_dead_letter_headers(str(exc), msg.topic, msg.partition, msg.offset),
            )
            continue
        key = event.conversation_id.encode()
        if key not in states:
            stored = table.get(key)
            states[key] = ConversationState.from_json(stored) if stored else None
        position = LogPosition(msg.partition, msg.offset)
        result = fold_event(states[key], event, position)
        states[key] = result.state
        if not result.applied:
            continue
        changed[key] = result.state
        fields: dict[Any, Any] = {
            hv.S_EVENT: item.value,
            hv.S_STATUS: result.state.status,
            hv.S_MESSAGES: result.state.message_count,
        }
        if result.message_sequence:
            fields[hv.S_SEQUENCE] = result.message_sequence
        pipe.xadd(
            hv.live_stream_key(event.tenant_id, event.conversation_id),
            fields,
            id=position.cursor,
            maxlen=settings.live_stream_maxlen,
            approximate=True,
        )
        appended += 1

    for state in changed.values():
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
        pipe.hset(hv.conversation_key(state.tenant_id, state.conversation_id), mapping=mirror)

    if appended or changed:
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            # A redelivered event's entry is already there: Redis refuses the repeated id.
            if isinstance(reply, ResponseError) and "equal or smaller" not in str(reply):
                raise reply
    for key, state in changed.items():
        table[key] = state.to_json()


def run_sessions(settings: Settings, loglevel: str = "info") -> None:
    app = create_app("sessions", settings)
    register_sessions(app, settings)
    run_worker(app, loglevel)


__all__ = ["register_sessions", "run_sessions"]
