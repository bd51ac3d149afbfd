"""The sessions worker: folds conversation events into a Faust table and mirrors it to Redis.

Per batch, in this order: fold every event; write the Redis mirror (hash + live stream); write the
table (its changelog); then Faust acks the batch. A crash anywhere in between redelivers the batch,
and every step is idempotent: the fold skips what it has applied, the live stream refuses an entry
id it already has (ids come from offsets), and the hash is overwritten with the same state.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from schemas import hotview as hv
from schemas.events import Event, EventDecodeError, LogPosition, decode_event
from services.settings import Settings
from streams._gaps import DeliveryGapGuard
from streams._retry import until_done
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

    @table.on_recover
    async def rewrite_mirror() -> None:
        # The table is the fold of the log; Redis only mirrors it. After recovery, write every
        # recovered state back, so a Redis that lost data (restart, failover) heals without a
        # replay and the ingress knows every conversation again. (Faust gathers these callbacks
        # with asyncio.wait, which would swallow an error: log it here.)
        try:
            written = await _mirror_all(table, await redis())
        except Exception:
            log.exception("rewriting the Redis mirror after recovery failed; it heals as events arrive")
            return
        log.info("mirrored %d recovered conversation states to Redis", written)

    guard = DeliveryGapGuard(settings.kafka_bootstrap, settings.conversation_topic, app.conf.id)
    guard.watch(app)

    @app.agent(topic, name="sessions")
    async def sessions(stream: Any) -> None:
        async for delivered in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            missing: list[Any] = []
            await _until_done(
                "checking for undelivered records",
                functools.partial(_find_missing, guard, delivered, missing),
            )
            records, rejected = _decode_batch([*missing, *delivered])
            if rejected:
                await _until_done("dead-lettering", functools.partial(_dead_letter, rejected, dead_letters))
            if records:
                client = await redis()
                fold = functools.partial(_fold_batch, records, table, client, settings)
                await _until_done("folding a batch", fold)


Record = tuple[Event, LogPosition, bytes]


async def _find_missing(guard: DeliveryGapGuard, batch: Sequence[Any], into: list[Any]) -> None:
    into[:] = await guard.missing_before(batch)


def _decode_batch(batch: Sequence[Any]) -> tuple[list[Record], list[Any]]:
    records: list[Record] = []
    rejected: list[Any] = []
    for item in batch:
        msg = item.message
        try:
            records.append((decode_event(item.value), LogPosition(msg.partition, msg.offset), item.value))
        except EventDecodeError as exc:
            log.error("dead-lettering %s/%s/%s: %s", msg.topic, msg.partition, msg.offset, exc)
            rejected.append((item, str(exc)))
    return records, rejected


async def _dead_letter(rejected: list[Any], dead_letters: Any) -> None:
    pending = []
    for item, reason in rejected:
        msg = item.message
        headers = _dead_letter_headers(reason, msg.topic, msg.partition, msg.offset)
        pending.append(await dead_letters.send(key=msg.key, value=item.value, headers=headers))
    await asyncio.gather(*pending)


async def _until_done(what: str, attempt: Callable[[], Awaitable[None]]) -> None:
    # A fold cancelled half-way may have written Redis but not the table: never ack it.
    await until_done(what, attempt, log=log, initial_s=0.1, max_s=5.0, cancel_mid_attempt_is_safe=False)


async def _mirror_all(table: Any, redis: aioredis.Redis) -> int:
    written = 0
    pipe = redis.pipeline(transaction=False)
    for _, stored in table.items():
        for state_json in _tenant_states(stored).values():
            state = ConversationState.from_json(state_json)
            pipe.hset(
                hv.conversation_key(state.tenant_id, state.conversation_id), mapping=_mirror_fields(state)
            )
            written += 1
            if written % 1000 == 0:
                await pipe.execute()
    await pipe.execute()
    return written


def _tenant_states(stored: Any) -> dict[str, dict[str, Any]]:
    """The table value for one conversation id: its state per tenant (ids are chosen per tenant,
    so two tenants may use the same one; the Kafka key, and so the partition, is the id alone)."""
    if not stored:
        return {}
    if "conversation_id" in stored:  # a single state, as written before states were per tenant
        return {stored["tenant_id"]: stored}
    return dict(stored)


async def _fold_batch(
    records: Sequence[Record], table: Any, redis: aioredis.Redis, settings: Settings
) -> None:
    stored: dict[bytes, dict[str, dict[str, Any]]] = {}
    states: dict[tuple[bytes, str], ConversationState | None] = {}
    changed: dict[tuple[bytes, str], ConversationState] = {}
    pipe = redis.pipeline(transaction=False)
    appended = 0
    for event, position, raw in records:
        key = event.conversation_id.encode()
        if key not in stored:
            stored[key] = _tenant_states(table.get(key))
        slot = (key, event.tenant_id)
        if slot not in states:
            known = stored[key].get(event.tenant_id)
            states[slot] = ConversationState.from_json(known) if known else None
        result = fold_event(states[slot], event, position)
        states[slot] = result.state
        if not result.applied:
            continue
        changed[slot] = result.state
        fields: dict[Any, Any] = {
            hv.S_EVENT: raw,
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

    documents = {slot: state.to_json() for slot, state in changed.items()}
    for slot, state in changed.items():
        mirror = _mirror_fields(state, documents[slot])
        pipe.hset(hv.conversation_key(state.tenant_id, state.conversation_id), mapping=mirror)

    if appended or changed:
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            # A redelivered event's entry is already there: Redis refuses the repeated id.
            if isinstance(reply, ResponseError) and "equal or smaller" not in str(reply):
                raise reply
    merged: dict[bytes, dict[str, dict[str, Any]]] = {}
    for (key, tenant), document in documents.items():
        merged.setdefault(key, dict(stored[key]))[tenant] = document
    for key, value in merged.items():
        table[key] = value


def _mirror_fields(state: ConversationState, document: dict[str, Any] | None = None) -> dict[Any, Any]:
    mirror: dict[Any, Any] = {
        hv.F_STATE: json.dumps(document if document is not None else state.to_json(), ensure_ascii=False),
        hv.F_CURSOR: LogPosition(state.last_partition, state.last_offset).cursor,
    }
    if state.status == STATUS_CLOSED:
        mirror[hv.F_CLOSED_NS] = state.closed_at_ns
    if state.created_at_ns:
        mirror[hv.F_CREATED_NS] = state.created_at_ns
        mirror[hv.F_CHANNEL] = state.channel
        mirror[hv.F_CUSTOMER] = state.customer_id
    return mirror


def run_sessions(settings: Settings, loglevel: str = "info") -> None:
    app = create_app("sessions", settings)
    register_sessions(app, settings)
    run_worker(app, loglevel)


__all__ = ["register_sessions", "run_sessions"]
