"""The projector's compiled payload encoders write exactly what MessageToJson writes, for every
payload type, with random values (floats, unknown enum numbers, maps, repeated messages, text
that JSON must escape), and the column-oriented batch reads back as the rows it was built from."""

from __future__ import annotations

import math
import random
import struct

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToJson
from switchboard.v1 import events_pb2 as pb

from schemas.events import LogPosition, new_event
from streams.projector import TABLE_ORDER, project
from streams.projector._rows import as_datetime, as_micros, payload_json

_TEXTS = ["", "a", '引号 " \\ \n\t', "emoji 😀", "\u2028\x00\x1f", "订单 SB20261130", "x" * 40]
_FLOATS = [0.0, -0.0, 0.1, 0.25, 0.333, 1e-45, 3.4e38, -2.5, 1 / 3, math.inf, -math.inf, math.nan]


def _random_value(fd: FieldDescriptor, rng: random.Random) -> object:
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        return rng.choice(_TEXTS)
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        numbers = [v.number for v in fd.enum_type.values]
        return rng.choice([*numbers, 99])  # 99: a number from a newer writer
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        value = rng.choice([*_FLOATS, rng.uniform(-1e6, 1e6), rng.random()])
        if kind == FieldDescriptor.TYPE_FLOAT and math.isfinite(value):
            value = struct.unpack("<f", struct.pack("<f", value))[0]
        return value
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rng.choice([0, 1, 255, 2**32 - 1])
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return rng.choice([0, -1, 7, -(2**31)])
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return rng.choice([0, -(2**63), 2**53 + 1])
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rng.choice([0, 2**64 - 1])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 5))
    raise AssertionError(f"no generator for {fd.full_name}")


def _fill(message: object, rng: random.Random, depth: int = 0) -> None:
    for fd in message.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        if rng.random() < 0.2:
            continue  # left unset
        target = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            entry = fd.message_type
            if entry.GetOptions().map_entry:
                key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
                for _ in range(rng.randint(0, 3)):
                    target[_random_value(key_fd, rng)] = _random_value(value_fd, rng)
            elif entry.full_name == "google.protobuf.Timestamp":
                (target.add() if fd.is_repeated else target).FromNanoseconds(rng.randint(0, 2**62))
            elif fd.is_repeated:
                for _ in range(rng.randint(0, 3)):
                    _fill(target.add(), rng, depth + 1)
            elif depth < 3:
                _fill(target, rng, depth + 1)
        elif fd.is_repeated:
            target.extend(_random_value(fd, rng) for _ in range(rng.randint(0, 3)))
        else:
            setattr(message, fd.name, _random_value(fd, rng))


def test_every_payload_type_is_written_as_message_to_json_writes_it() -> None:
    rng = random.Random(7)
    oneof = pb.Event.DESCRIPTOR.oneofs_by_name["payload"]
    for fd in oneof.fields:
        for _ in range(200):
            event = pb.Event(event_id="e1", tenant_id="acme", conversation_id="c1")
            payload = getattr(event, fd.name)
            payload.SetInParent()
            _fill(payload, rng)
            expected = MessageToJson(
                payload, preserving_proto_field_name=True, indent=None, ensure_ascii=False, sort_keys=True
            )
            assert payload_json(event) == expected, fd.name


def test_an_event_without_payload_is_an_empty_object() -> None:
    assert payload_json(pb.Event(event_id="e", conversation_id="c")) == "{}"


def test_microseconds_round_trip() -> None:
    for micros in (0, 1, 1_700_000_000_123_456, 10_413_791_999_000_000):
        assert as_micros(as_datetime(micros)) == micros


def test_columns_are_the_rows_transposed() -> None:
    events = [
        new_event("acme", "c1", message_received=pb.MessageReceived(text="hi", sender=pb.SENDER_CUSTOMER)),
        new_event("acme", "c1", csat_rated=pb.CsatRated(score=4, comment="ok")),
    ]
    batch = project([(e, LogPosition(0, i)) for i, e in enumerate(events)])
    rows = batch.rows
    for table in TABLE_ORDER:
        assert batch.size(table) == len(rows[table])
        for i, row in enumerate(rows[table]):
            assert len(row) == len(batch.columns(table))
            for value, column in zip(row, batch.data[table], strict=True):
                raw = column[i]
                # Timestamps are microseconds in the columns, datetimes in the rows.
                if raw is not None and value != raw:
                    assert isinstance(raw, (int, tuple))
