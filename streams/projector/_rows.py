"""Events to ClickHouse rows. Pure: no Kafka, no ClickHouse, no clock.

`project` turns a batch of decoded events and their log positions into rows for each storage
table of `schemas/clickhouse` (the `raw_*` tables and `conversation_facts`; analysts read the
exact views over them). The same batch always gives the same rows, and every table deduplicates
what it is given twice (see the migrations), so writing a batch again is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring as _js
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToJson
from switchboard.v1 import events_pb2

from schemas.events import Event, LogPosition, event_type
from streams.privacy import redact_event

EVENTS = "raw_events"
MESSAGES = "raw_messages"
REPLIES = "raw_replies"
INTENTS = "raw_intents"
HANDOFFS = "raw_handoffs"
CSAT = "raw_csat"
CONVERSATION_FACTS = "conversation_facts"

COLUMNS: dict[str, tuple[str, ...]] = {
    EVENTS: (
        "event_id",
        "tenant_id",
        "conversation_id",
        "type",
        "occurred_at",
        "causation_id",
        "traceparent",
        "schema_version",
        "partition",
        "offset",
        "payload_json",
    ),
    MESSAGES: (
        "tenant_id",
        "conversation_id",
        "message_key",
        "event_id",
        "client_message_id",
        "sender",
        "agent_id",
        "text",
        "occurred_at",
        "partition",
        "offset",
    ),
    REPLIES: (
        "tenant_id",
        "conversation_id",
        "event_id",
        "message_event_id",
        "text",
        "model",
        "adapter",
        "intent",
        "language",
        "grounded",
        "reply_id",
        "citation_document_ids",
        "citation_chunk_ids",
        "citation_scores",
        "citation_count",
        "latency_ms",
        "first_token_ms",
        "prompt_tokens",
        "completion_tokens",
        "occurred_at",
        "partition",
        "offset",
    ),
    INTENTS: (
        "tenant_id",
        "conversation_id",
        "event_id",
        "message_event_id",
        "intent",
        "confidence",
        "model",
        "stage",
        "model_version",
        "language",
        "occurred_at",
        "partition",
        "offset",
    ),
    HANDOFFS: (
        "tenant_id",
        "conversation_id",
        "event_id",
        "kind",
        "reason",
        "queue",
        "agent_id",
        "message_event_id",
        "previous_agent_id",
        "occurred_at",
        "partition",
        "offset",
    ),
    CSAT: (
        "tenant_id",
        "conversation_id",
        "event_id",
        "score",
        "comment",
        "occurred_at",
        "partition",
        "offset",
    ),
    CONVERSATION_FACTS: (
        "tenant_id",
        "conversation_id",
        "channel",
        "customer_id",
        "locale",
        "started_at",
        "closed_at",
        "resolution",
        "closed_by",
        "first_event_at",
        "last_event_at",
        "first_customer_message_at",
        "first_response_at",
        "first_handoff_at",
        "first_assigned_at",
        "mode_change",
        "assignee_change",
        "csat_change",
        "first_intent",
    ),
}

# Insert order: `events` last, so a reader that sees an event also sees its projections.
TABLE_ORDER: tuple[str, ...] = (
    MESSAGES,
    REPLIES,
    INTENTS,
    HANDOFFS,
    CSAT,
    CONVERSATION_FACTS,
    EVENTS,
)


@dataclass(slots=True)
class ProjectionBatch:
    """Rows per table, each row a list in the order of `COLUMNS[table]`."""

    rows: dict[str, list[list[Any]]] = field(default_factory=lambda: {t: [] for t in TABLE_ORDER})

    def columns(self, table: str) -> tuple[str, ...]:
        return COLUMNS[table]

    @property
    def row_count(self) -> int:
        return sum(len(r) for r in self.rows.values())

    def __bool__(self) -> bool:
        return self.row_count > 0


def enum_label(enum: Any, value: int, prefix: str) -> str:
    """``CHANNEL_WEB`` -> ``web``; an unknown number (a newer writer) -> its number."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def channel_label(value: int) -> str:
    return "" if value == 0 else enum_label(events_pb2.Channel, value, "CHANNEL_")


def sender_label(value: int) -> str:
    return "" if value == 0 else enum_label(events_pb2.Sender, value, "SENDER_")


def occurred_at(event: Event) -> datetime:
    # ClickHouse keeps microseconds (DateTime64(6)); the envelope has nanoseconds.
    micros = event.occurred_at.ToNanoseconds() // 1000
    return datetime.fromtimestamp(micros // 1_000_000, UTC).replace(microsecond=micros % 1_000_000)


def payload_json(event: Event) -> str:
    kind = event_type(event)
    if not kind:
        return "{}"
    payload = getattr(event, kind)
    if payload.DESCRIPTOR in _FLAT:
        return _flat_json(payload)
    return MessageToJson(
        payload,
        preserving_proto_field_name=True,
        indent=None,
        ensure_ascii=False,
        sort_keys=True,
    )


_SCALARS = {
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}


def _is_flat(descriptor: Any) -> bool:
    return all(f.type in _SCALARS and not _is_repeated(f) for f in descriptor.fields)


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


# Payloads with only singular strings, enums, bools and 32-bit integers (most events: messages,
# closes, handoffs, CSAT): MessageToJson's output built directly, at a fifth of its cost (it was
# the projector's top cost). The others (floats, maps, repeated messages) keep MessageToJson.
_FLAT = frozenset(
    f.message_type
    for f in events_pb2.Event.DESCRIPTOR.oneofs_by_name["payload"].fields
    if _is_flat(f.message_type)
)


def _flat_json(payload: Any) -> str:
    # json.dumps(..., sort_keys=True, ensure_ascii=False) by hand: dumps builds an encoder per
    # call, which cost more than the encoding here.
    items = []
    for descriptor, value in payload.ListFields():
        kind = descriptor.type
        if kind == FieldDescriptor.TYPE_STRING:
            text = _js(value)
        elif kind == FieldDescriptor.TYPE_ENUM:
            known = descriptor.enum_type.values_by_number.get(value)
            text = _js(known.name) if known is not None else str(value)
        elif kind == FieldDescriptor.TYPE_BOOL:
            text = "true" if value else "false"
        else:
            text = str(int(value))
        items.append((descriptor.name, text))
    items.sort()
    return "{" + ", ".join(f"{_js(name)}: {text}" for name, text in items) + "}"


# Neutral values of the max/min tuple columns of conversation_facts: never win over a real event.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NEVER = datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC)
NO_CHANGE: tuple[datetime, str, str] = (EPOCH, "", "")
NO_CSAT: tuple[datetime, str, int, str] = (EPOCH, "", 0, "")
NO_INTENT: tuple[datetime, str, str] = (NEVER, "", "")

MODE_BOT = "bot"
MODE_AGENT = "agent"


@dataclass(slots=True)
class _Facts:
    """A partial conversation row; merged with the same aggregates ClickHouse uses (min/max).

    Every field is combined with an idempotent, order-free aggregate, so the rows of any batches
    in any order, some of them twice, merge to the same conversation.
    """

    tenant_id: str
    conversation_id: str
    channel: str = ""
    customer_id: str = ""
    locale: str = ""
    started_at: datetime | None = None
    closed_at: datetime | None = None
    resolution: str = ""
    closed_by: str = ""
    first_event_at: datetime | None = None
    last_event_at: datetime | None = None
    first_customer_message_at: datetime | None = None
    first_response_at: datetime | None = None
    first_handoff_at: datetime | None = None
    first_assigned_at: datetime | None = None
    # (occurred_at, event_id, value): the latest event wins (max), ties broken by event id.
    mode_change: tuple[datetime, str, str] = NO_CHANGE
    assignee_change: tuple[datetime, str, str] = NO_CHANGE
    csat_change: tuple[datetime, str, int, str] = NO_CSAT
    # The earliest classification wins (min).
    first_intent: tuple[datetime, str, str] = NO_INTENT

    def row(self) -> list[Any]:
        return [
            self.tenant_id,
            self.conversation_id,
            self.channel,
            self.customer_id,
            self.locale,
            self.started_at,
            self.closed_at,
            self.resolution,
            self.closed_by,
            self.first_event_at,
            self.last_event_at,
            self.first_customer_message_at,
            self.first_response_at,
            self.first_handoff_at,
            self.first_assigned_at,
            self.mode_change,
            self.assignee_change,
            self.csat_change,
            self.first_intent,
        ]


def _min(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b < a else a


def _max(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def _message_row(
    tenant: str,
    conversation: str,
    event_id: str,
    client_message_id: str,
    sender: str,
    agent_id: str,
    text: str,
    where: list[Any],
) -> list[Any]:
    # message_key: the client's idempotency key when there is one, else the event id.
    return [
        tenant,
        conversation,
        client_message_id or event_id,
        event_id,
        client_message_id,
        sender,
        agent_id,
        text,
        *where,
    ]


def project(records: Sequence[tuple[Event, LogPosition]]) -> ProjectionBatch:
    """Rows for every table from a batch of events; the same input always gives the same rows."""
    batch = ProjectionBatch()
    rows = batch.rows
    facts: dict[tuple[str, str], _Facts] = {}
    for event, position in records:
        # PII in free text is masked before it becomes a row (streams/privacy; per tenant).
        event = redact_event(event)
        kind = event_type(event)
        at = occurred_at(event)
        where = [at, position.partition, position.offset]
        tenant, conversation, event_id = event.tenant_id, event.conversation_id, event.event_id
        rows[EVENTS].append(
            [
                event_id,
                tenant,
                conversation,
                kind,
                at,
                event.causation_id,
                event.trace.traceparent,
                event.schema_version,
                position.partition,
                position.offset,
                payload_json(event),
            ]
        )
        key = (tenant, conversation)
        fact = facts.get(key)
        if fact is None:
            fact = facts[key] = _Facts(tenant, conversation)
        fact.first_event_at = _min(fact.first_event_at, at)
        fact.last_event_at = _max(fact.last_event_at, at)

        if kind == "conversation_started":
            started = event.conversation_started
            fact.channel = max(fact.channel, channel_label(started.channel))
            fact.customer_id = max(fact.customer_id, started.customer_id)
            fact.locale = max(fact.locale, started.locale)
            fact.started_at = _min(fact.started_at, at)
        elif kind == "conversation_closed":
            closed = event.conversation_closed
            fact.closed_at = _min(fact.closed_at, at)
            fact.resolution = max(fact.resolution, closed.resolution)
            fact.closed_by = max(fact.closed_by, sender_label(closed.closed_by))
        elif kind == "message_received":
            msg = event.message_received
            sender = sender_label(msg.sender)
            if sender in ("customer", ""):
                fact.first_customer_message_at = _min(fact.first_customer_message_at, at)
            elif sender in ("bot", "agent"):
                fact.first_response_at = _min(fact.first_response_at, at)
            rows[MESSAGES].append(
                _message_row(
                    tenant, conversation, event_id, msg.client_message_id, sender, "", msg.text, where
                )
            )
        elif kind == "agent_message_sent":
            sent = event.agent_message_sent
            fact.first_response_at = _min(fact.first_response_at, at)
            rows[MESSAGES].append(
                _message_row(
                    tenant,
                    conversation,
                    event_id,
                    sent.client_message_id,
                    "agent",
                    sent.agent_id,
                    sent.text,
                    where,
                )
            )
        elif kind == "reply_generated":
            reply = event.reply_generated
            fact.first_response_at = _min(fact.first_response_at, at)
            rows[REPLIES].append(
                [
                    tenant,
                    conversation,
                    event_id,
                    reply.message_event_id,
                    reply.text,
                    reply.model,
                    reply.adapter,
                    reply.intent,
                    reply.language,
                    reply.grounded,
                    reply.reply_id or event_id,
                    [c.document_id for c in reply.citations],
                    [c.chunk_id for c in reply.citations],
                    [c.score for c in reply.citations],
                    min(len(reply.citations), 65535),
                    reply.latency_ms,
                    reply.first_token_ms,
                    reply.prompt_tokens,
                    reply.completion_tokens,
                    *where,
                ]
            )
        elif kind == "intent_classified":
            intent = event.intent_classified
            fact.first_intent = min(fact.first_intent, (at, event_id, intent.intent))
            rows[INTENTS].append(
                [
                    tenant,
                    conversation,
                    event_id,
                    intent.message_event_id,
                    intent.intent,
                    intent.confidence,
                    intent.model,
                    intent.stage,
                    intent.model_version,
                    intent.language,
                    *where,
                ]
            )
        elif kind == "handoff_requested":
            handoff = event.handoff_requested
            fact.first_handoff_at = _min(fact.first_handoff_at, at)
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_AGENT))
            rows[HANDOFFS].append(
                [
                    tenant,
                    conversation,
                    event_id,
                    kind,
                    handoff.reason,
                    handoff.queue,
                    "",
                    handoff.message_event_id,
                    "",
                    *where,
                ]
            )
        elif kind == "agent_assigned":
            assigned = event.agent_assigned
            fact.first_assigned_at = _min(fact.first_assigned_at, at)
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_AGENT))
            fact.assignee_change = max(fact.assignee_change, (at, event_id, assigned.agent_id))
            rows[HANDOFFS].append(
                [
                    tenant,
                    conversation,
                    event_id,
                    kind,
                    "",
                    assigned.queue,
                    assigned.agent_id,
                    "",
                    assigned.previous_agent_id,
                    *where,
                ]
            )
        elif kind == "returned_to_bot":
            returned = event.returned_to_bot
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_BOT))
            fact.assignee_change = max(fact.assignee_change, (at, event_id, ""))
            rows[HANDOFFS].append(
                [tenant, conversation, event_id, kind, "", "", returned.agent_id, "", "", *where]
            )
        elif kind == "csat_rated":
            rated = event.csat_rated
            score = min(rated.score, 255)
            fact.csat_change = max(fact.csat_change, (at, event_id, score, rated.comment))
            rows[CSAT].append([tenant, conversation, event_id, score, rated.comment, *where])
    rows[CONVERSATION_FACTS] = [fact.row() for fact in facts.values()]
    return batch
