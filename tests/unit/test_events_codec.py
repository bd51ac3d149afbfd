import uuid

import pytest
from switchboard.v1 import events_pb2

from schemas.events import (
    HEADER_TYPE,
    EventDecodeError,
    decode_event,
    encode_event,
    event_headers,
    event_key,
    event_type,
    new_event,
)


def _message(text: str = "你好, where is my order?") -> events_pb2.Event:
    return new_event(
        "acme",
        "conv-1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        message_received=events_pb2.MessageReceived(client_message_id="m-1", text=text),
    )


def test_round_trip_keeps_every_field():
    event = _message()
    decoded = decode_event(encode_event(event))
    assert decoded == event
    assert event_type(decoded) == "message_received"
    assert decoded.message_received.text == "你好, where is my order?"
    assert decoded.schema_version == 1


def test_event_id_is_uuid7_and_time_ordered():
    ids = [new_event("t", "c", csat_rated=events_pb2.CsatRated(score=5)).event_id for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids)


def test_key_and_headers():
    event = _message()
    assert event_key(event) == b"conv-1"
    headers = dict(event_headers(event))
    assert headers[HEADER_TYPE] == b"message_received"
    assert headers["traceparent"].startswith(b"00-")


@pytest.mark.parametrize(
    "raw", [b"", None, b"\xff\xff\xff\xff", encode_event(events_pb2.Event(event_id="x"))]
)
def test_garbage_is_refused(raw):
    with pytest.raises(EventDecodeError):
        decode_event(raw)


def test_exactly_one_payload():
    with pytest.raises(ValueError):
        new_event("t", "c")
