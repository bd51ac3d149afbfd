"""Events to ClickHouse rows. Pure: no Kafka, no ClickHouse, no clock.

`project` turns a batch of decoded events and their log positions into rows for each storage
table of `schemas/clickhouse` (the `raw_*` tables and `conversation_facts`; analysts read the
exact views over them). The same batch always gives the same rows, and every table deduplicates
what it is given twice (see the migrations), so writing a batch again is harmless.
"""

from __future__ import annotations

import base64
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.encoder import encode_basestring as _js
from typing import Any, Protocol

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers
from google.protobuf.json_format import MessageToJson
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event, event_type
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
        "first_close",
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


# Columns of DateTime64(6) values, and tuple columns whose first element is one. A batch holds
# them as microseconds since the epoch (ints): clickhouse-connect writes ints as they are, and
# converted every datetime in Python (a datetime per value built here, taken apart there).
TIME_COLUMNS = frozenset(
    {
        "occurred_at",
        "started_at",
        "closed_at",
        "first_event_at",
        "last_event_at",
        "first_customer_message_at",
        "first_response_at",
        "first_handoff_at",
        "first_assigned_at",
    }
)
# Tuple columns with a timestamp, and where it sits in the tuple.
TIME_TUPLE_COLUMNS = {
    "mode_change": 0,
    "assignee_change": 0,
    "csat_change": 0,
    "first_intent": 0,
    "first_close": 1,
}

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def as_datetime(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def as_micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def _empty_columns() -> dict[str, list[list[Any]]]:
    return {t: [[] for _ in COLUMNS[t]] for t in TABLE_ORDER}


def _readable(name: str, column: list[Any]) -> list[Any]:
    if name in TIME_COLUMNS:
        return [None if v is None else as_datetime(v) for v in column]
    if name in TIME_TUPLE_COLUMNS:
        i = TIME_TUPLE_COLUMNS[name]
        return [(*v[:i], as_datetime(v[i]), *v[i + 1 :]) for v in column]
    return column


@dataclass(slots=True)
class ProjectionBatch:
    """Per table, one list per column in the order of `COLUMNS[table]` (what a column-oriented
    insert takes as it is), timestamps as microseconds (see `TIME_COLUMNS`). `rows` gives the
    same values row by row, timestamps as datetimes."""

    data: dict[str, list[list[Any]]] = field(default_factory=_empty_columns)

    def columns(self, table: str) -> tuple[str, ...]:
        return COLUMNS[table]

    def size(self, table: str) -> int:
        columns = self.data.get(table)
        return len(columns[0]) if columns else 0

    @property
    def rows(self) -> dict[str, list[list[Any]]]:
        out: dict[str, list[list[Any]]] = {}
        for table, columns in self.data.items():
            readable = [_readable(n, c) for n, c in zip(COLUMNS[table], columns, strict=True)]
            out[table] = [list(row) for row in zip(*readable, strict=True)]
        return out

    @property
    def row_count(self) -> int:
        return sum(self.size(t) for t in self.data)

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


# Labels per enum number, computed once (enum_label per event was a measurable share).
_CHANNELS: dict[int, str] = {v.number: channel_label(v.number) for v in events_pb2.Channel.DESCRIPTOR.values}
_SENDERS: dict[int, str] = {v.number: sender_label(v.number) for v in events_pb2.Sender.DESCRIPTOR.values}


def occurred_at(event: Event) -> datetime:
    # ClickHouse keeps microseconds (DateTime64(6)); the envelope has nanoseconds.
    return as_datetime(occurred_micros(event))


def occurred_micros(event: Event) -> int:
    ts = event.occurred_at
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def payload_json(event: Event) -> str:
    """The payload as MessageToJson writes it (proto field names, sorted keys, no ASCII
    escaping), by an encoder compiled per payload type: MessageToJson was the projector's top
    cost. A type the encoders do not cover (well-known types such as Timestamp, extensions)
    keeps MessageToJson."""
    kind = event_type(event)
    if not kind:
        return "{}"
    return _payload_json(getattr(event, kind))


def _payload_json(payload: Any) -> str:
    descriptor = payload.DESCRIPTOR
    encode = _ENCODERS.get(descriptor)
    if encode is None:
        encode = _ENCODERS[descriptor] = _message_encoder(descriptor, set()) or _message_to_json
    return encode(payload)


def _message_to_json(payload: Any) -> str:
    return MessageToJson(
        payload,
        preserving_proto_field_name=True,
        indent=None,
        ensure_ascii=False,
        sort_keys=True,
    )


_Encode = Callable[[Any], str]
_ENCODERS: dict[Any, _Encode] = {}
_INT32 = frozenset(
    {
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
    }
)
_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _int64(value: int) -> str:
    return f'"{value}"'  # proto JSON writes 64-bit integers as strings


def _bytes(value: bytes) -> str:
    return '"' + base64.b64encode(value).decode() + '"'


def _special_float(value: float) -> str | None:
    if value != value:
        return '"NaN"'
    if value in (_INF, -_INF):
        return '"Infinity"' if value > 0 else '"-Infinity"'
    return None


_INF = float("inf")
_SHORTEST: dict[float, str] = {}


def _float32(value: float) -> str:
    # The shortest decimal that is the same 4-byte float (ToShortestFloat), as json.dumps
    # writes it; remembered per value (scores and confidences repeat).
    text = _SHORTEST.get(value)
    if text is None:
        text = _special_float(value) or repr(type_checkers.ToShortestFloat(value))
        if len(_SHORTEST) > 65_536:
            _SHORTEST.clear()
        _SHORTEST[value] = text
    return text


def _double(value: float) -> str:
    return _special_float(value) or repr(value)


def _is_map(field_descriptor: Any) -> bool:
    message = field_descriptor.message_type
    return bool(
        field_descriptor.type == FieldDescriptor.TYPE_MESSAGE
        and message.has_options
        and message.GetOptions().map_entry
    )


def _scalar_encoder(fd: Any, building: set[Any]) -> _Encode | None:
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _js
    if kind == FieldDescriptor.TYPE_BOOL:
        return _bool
    if kind in _INT32:
        return int.__repr__
    if kind in _INT64:
        return _int64
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _float32
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _double
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes
    if kind == FieldDescriptor.TYPE_ENUM:
        if any(v.has_options for v in fd.enum_type.values):
            return None  # a json_name option on a value: MessageToJson's business
        names = {v.number: _js(v.name) for v in fd.enum_type.values}
        # An unknown number (a newer writer) is written as the number, like MessageToJson.
        return lambda value: names.get(value) or str(value)
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _message_encoder(fd.message_type, building)
    return None


# How `_message_encoder` tells a field MessageToJson would write (ListFields' rule): a repeated or
# map field when not empty, a field with explicit presence (messages, `optional`) when set, an
# implicit-presence scalar when not its default (a float: when not +0.0; -0.0 counts as set).
_NONEMPTY, _HAS, _NONZERO_FLOAT = 0, 1, 2


def _message_encoder(descriptor: Any, building: set[Any]) -> _Encode | None:
    """An encoder for messages of this type, or None when some field needs MessageToJson.

    It visits the fields in name order (the order of the sorted keys) and reads each one; that
    beat ListFields + a sort by three times on the replies' dozen fields."""
    if (
        descriptor.full_name.startswith("google.protobuf.")
        or descriptor in building
        or descriptor.extension_ranges
    ):
        return None  # well-known types have their own JSON forms; recursion is not worth it
    building = building | {descriptor}
    fields: list[tuple[str, str, _Encode, int]] = []
    for fd in sorted(descriptor.fields, key=lambda f: f.name):
        key = _js(fd.name) + ": "
        if _is_map(fd):
            k_fd, v_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            value_encoder = _scalar_encoder(v_fd, building)
            if value_encoder is None:
                return None
            encode = _map_encoder(k_fd.type == FieldDescriptor.TYPE_BOOL, value_encoder)
            test = _NONEMPTY
        else:
            item = _scalar_encoder(fd, building)
            if item is None:
                return None
            encode = _list_encoder(item) if fd.is_repeated else item
            if fd.is_repeated:
                test = _NONEMPTY
            elif fd.has_presence:
                test = _HAS
            elif fd.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
                test = _NONZERO_FLOAT
            else:
                test = _NONEMPTY
        fields.append((fd.name, key, encode, test))

    def encode_message(message: Any) -> str:
        parts = []
        for name, key, encode, test in fields:
            if test == _HAS:
                if not message.HasField(name):
                    continue
                value = getattr(message, name)
            else:
                value = getattr(message, name)
                if not value and (test == _NONEMPTY or math.copysign(1.0, value) > 0):
                    continue
            parts.append(key + encode(value))
        return "{" + ", ".join(parts) + "}"

    return encode_message


def _list_encoder(item: _Encode) -> _Encode:
    return lambda values: "[" + ", ".join(map(item, values)) + "]"


def _map_encoder(bool_keys: bool, value: _Encode) -> _Encode:
    def encode(entries: Any) -> str:
        # json.dumps(sort_keys=True) of {str(key): value}: keys as strings, sorted as strings.
        keyed = sorted((("true" if k else "false") if bool_keys else str(k), entries[k]) for k in entries)
        return "{" + ", ".join([f"{_js(k)}: {value(v)}" for k, v in keyed]) + "}"

    return encode


# Neutral values of the max/min tuple columns of conversation_facts: never win over a real event
# (the timestamps in microseconds since the epoch, like every timestamp of a batch).
NEVER_MICROS = as_micros(datetime(2299, 12, 31, 23, 59, 59, tzinfo=UTC))
NEVER = as_datetime(NEVER_MICROS)
NO_CHANGE: tuple[int, str, str] = (0, "", "")
NO_CSAT: tuple[int, str, int, str] = (0, "", 0, "")
NO_INTENT_MICROS: tuple[int, str, str] = (NEVER_MICROS, "", "")
NO_CLOSE_OFFSET = 2**64 - 1
NO_CLOSE_MICROS: tuple[int, int, str, str] = (NO_CLOSE_OFFSET, NEVER_MICROS, "", "")
# As `rows` shows them.
NO_INTENT: tuple[datetime, str, str] = (NEVER, "", "")
NO_CLOSE: tuple[int, datetime, str, str] = (NO_CLOSE_OFFSET, NEVER, "", "")

MODE_BOT = "bot"
MODE_AGENT = "agent"


@dataclass(slots=True)
class _Facts:
    """A partial conversation row; merged with the same aggregates ClickHouse uses (min/max).

    Every field is combined with an idempotent, order-free aggregate, so the rows of any batches
    in any order, some of them twice, merge to the same conversation. Timestamps in microseconds.
    """

    tenant_id: str
    conversation_id: str
    first_event_at: int
    last_event_at: int
    channel: str = ""
    customer_id: str = ""
    locale: str = ""
    started_at: int | None = None
    closed_at: int | None = None
    resolution: str = ""
    closed_by: str = ""
    first_customer_message_at: int | None = None
    first_response_at: int | None = None
    first_handoff_at: int | None = None
    first_assigned_at: int | None = None
    # (occurred_at, event_id, value): the latest event wins (max), ties broken by event id.
    mode_change: tuple[int, str, str] = NO_CHANGE
    assignee_change: tuple[int, str, str] = NO_CHANGE
    csat_change: tuple[int, str, int, str] = NO_CSAT
    # The earliest classification wins (min).
    first_intent: tuple[int, str, str] = NO_INTENT_MICROS
    # (offset, closed_at, resolution, closed_by): the first close in the log wins (min), as in the
    # sessions fold (a conversation's events share one partition). Not by time: the late copy of
    # a stalled process's close carries the earlier timestamp.
    first_close: tuple[int, int, str, str] = NO_CLOSE_MICROS

    def row(self) -> tuple[Any, ...]:
        return (
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
            self.first_close,
        )


def _min(a: int | None, b: int) -> int:
    return b if a is None or b < a else a


_call = operator.call


def _appenders(batch: ProjectionBatch, table: str) -> tuple[Callable[[Any], None], ...]:
    return tuple(column.append for column in batch.data[table])


class Position(Protocol):
    """Where an event sits in the log: a `LogPosition`, or the Kafka record it came in."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


def project(records: Sequence[tuple[Event, Position]]) -> ProjectionBatch:
    """Rows for every table from a batch of events; the same input always gives the same rows.

    Values go straight into their columns: `any(map(_call, appenders, row))` appends each value
    of a row to its column without a Python-level loop (append returns None, so `any` runs the
    whole map), and no per-row container outlives the call (a list per row was most of the cyclic
    garbage collector's work)."""
    batch = ProjectionBatch()
    to_events = _appenders(batch, EVENTS)
    to_messages = _appenders(batch, MESSAGES)
    to_replies = _appenders(batch, REPLIES)
    to_intents = _appenders(batch, INTENTS)
    to_handoffs = _appenders(batch, HANDOFFS)
    to_csat = _appenders(batch, CSAT)
    facts: dict[tuple[str, str], _Facts] = {}
    for event, position in records:
        # PII in free text is masked before it becomes a row (streams/privacy; per tenant).
        event = redact_event(event)
        kind = event.WhichOneof("payload") or ""
        at = occurred_micros(event)
        partition, offset = position.partition, position.offset
        tenant, conversation, event_id = event.tenant_id, event.conversation_id, event.event_id
        payload: Any = getattr(event, kind) if kind else None
        any(
            map(
                _call,
                to_events,
                (
                    event_id,
                    tenant,
                    conversation,
                    kind,
                    at,
                    event.causation_id,
                    event.trace.traceparent,
                    event.schema_version,
                    partition,
                    offset,
                    "{}" if payload is None else _payload_json(payload),
                ),
            )
        )
        key = (tenant, conversation)
        fact = facts.get(key)
        if fact is None:
            fact = facts[key] = _Facts(tenant, conversation, at, at)
        elif at < fact.first_event_at:
            fact.first_event_at = at
        elif at > fact.last_event_at:
            fact.last_event_at = at

        if kind == "message_received":
            sender = _SENDERS.get(payload.sender) or sender_label(payload.sender)
            if sender in ("customer", ""):
                fact.first_customer_message_at = _min(fact.first_customer_message_at, at)
            elif sender in ("bot", "agent"):
                fact.first_response_at = _min(fact.first_response_at, at)
            client_id = payload.client_message_id
            # message_key: the client's idempotency key when there is one, else the event id.
            any(
                map(
                    _call,
                    to_messages,
                    (
                        tenant,
                        conversation,
                        client_id or event_id,
                        event_id,
                        client_id,
                        sender,
                        "",
                        payload.text,
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "intent_classified":
            fact.first_intent = min(fact.first_intent, (at, event_id, payload.intent))
            any(
                map(
                    _call,
                    to_intents,
                    (
                        tenant,
                        conversation,
                        event_id,
                        payload.message_event_id,
                        payload.intent,
                        payload.confidence,
                        payload.model,
                        payload.stage,
                        payload.model_version,
                        payload.language,
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "reply_generated":
            fact.first_response_at = _min(fact.first_response_at, at)
            citations = payload.citations
            any(
                map(
                    _call,
                    to_replies,
                    (
                        tenant,
                        conversation,
                        event_id,
                        payload.message_event_id,
                        payload.text,
                        payload.model,
                        payload.adapter,
                        payload.intent,
                        payload.language,
                        payload.grounded,
                        payload.reply_id or event_id,
                        [c.document_id for c in citations],
                        [c.chunk_id for c in citations],
                        [c.score for c in citations],
                        min(len(citations), 65535),
                        payload.latency_ms,
                        payload.first_token_ms,
                        payload.prompt_tokens,
                        payload.completion_tokens,
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "conversation_started":
            fact.channel = max(fact.channel, _CHANNELS.get(payload.channel) or channel_label(payload.channel))
            fact.customer_id = max(fact.customer_id, payload.customer_id)
            fact.locale = max(fact.locale, payload.locale)
            fact.started_at = _min(fact.started_at, at)
        elif kind == "conversation_closed":
            fact.closed_at = _min(fact.closed_at, at)
            fact.resolution = max(fact.resolution, payload.resolution)
            closed_by = _SENDERS.get(payload.closed_by) or sender_label(payload.closed_by)
            fact.closed_by = max(fact.closed_by, closed_by)
            fact.first_close = min(fact.first_close, (offset, at, payload.resolution, closed_by))
        elif kind == "agent_message_sent":
            fact.first_response_at = _min(fact.first_response_at, at)
            client_id = payload.client_message_id
            any(
                map(
                    _call,
                    to_messages,
                    (
                        tenant,
                        conversation,
                        # Agents' ids are a space of their own (see hotview.agent_claim).
                        hv.agent_claim(client_id) if client_id else event_id,
                        event_id,
                        client_id,
                        "agent",
                        payload.agent_id,
                        payload.text,
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "handoff_requested":
            fact.first_handoff_at = _min(fact.first_handoff_at, at)
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_AGENT))
            any(
                map(
                    _call,
                    to_handoffs,
                    (
                        tenant,
                        conversation,
                        event_id,
                        kind,
                        payload.reason,
                        payload.queue,
                        "",
                        payload.message_event_id,
                        "",
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "agent_assigned":
            fact.first_assigned_at = _min(fact.first_assigned_at, at)
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_AGENT))
            fact.assignee_change = max(fact.assignee_change, (at, event_id, payload.agent_id))
            any(
                map(
                    _call,
                    to_handoffs,
                    (
                        tenant,
                        conversation,
                        event_id,
                        kind,
                        "",
                        payload.queue,
                        payload.agent_id,
                        "",
                        payload.previous_agent_id,
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "returned_to_bot":
            fact.mode_change = max(fact.mode_change, (at, event_id, MODE_BOT))
            fact.assignee_change = max(fact.assignee_change, (at, event_id, ""))
            any(
                map(
                    _call,
                    to_handoffs,
                    (
                        tenant,
                        conversation,
                        event_id,
                        kind,
                        "",
                        "",
                        payload.agent_id,
                        "",
                        "",
                        at,
                        partition,
                        offset,
                    ),
                )
            )
        elif kind == "csat_rated":
            score = min(payload.score, 255)
            fact.csat_change = max(fact.csat_change, (at, event_id, score, payload.comment))
            any(
                map(
                    _call,
                    to_csat,
                    (tenant, conversation, event_id, score, payload.comment, at, partition, offset),
                )
            )
    if facts:
        batch.data[CONVERSATION_FACTS] = [
            list(c) for c in zip(*(f.row() for f in facts.values()), strict=True)
        ]
    return batch
