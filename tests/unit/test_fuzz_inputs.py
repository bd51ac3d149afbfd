"""Property-based fuzzing (hypothesis) of what hostile input reaches first: request validation,
the request deserializer, the event codec, and the API-key parsers. Each either accepts or refuses
with its own precise error, never anything else, and what it accepts satisfies the contract."""

from __future__ import annotations

import json

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from switchboard.v1 import chat_pb2, events_pb2

from schemas.events import EventDecodeError, decode_event, encode_event, new_event
from services.auth import KeyRecord, TenantRecord, bearer_token, decode_record, parse_token
from services.ingress import _validation as v
from services.ingress._server import _deserializer

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text with everything hostile input has: controls, surrogates-free unicode, long runs.
hostile_text = st.text(st.characters(codec="utf-8"), max_size=300) | st.text(max_size=20_000)
REFUSAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


def verdict(check: object, *args: object, **kwargs: object) -> v.RequestRejected | None:
    try:
        check(*args, **kwargs)  # type: ignore[operator]
    except v.RequestRejected as refused:
        assert refused.code in REFUSAL_CODES
        assert refused.message and len(refused.message) < 2000
        return refused
    return None


@FUZZ
@given(hostile_text, st.frozensets(st.text(max_size=10), max_size=3))
def test_tenant_ids(tenant_id: str, allowed: frozenset[str]) -> None:
    if verdict(v.check_tenant, tenant_id, allowed) is None:
        assert 1 <= len(tenant_id) <= 64 and tenant_id.isascii() and tenant_id.isprintable()
        assert not allowed or tenant_id in allowed


@FUZZ
@given(hostile_text)
def test_conversation_and_message_ids(value: str) -> None:
    if verdict(v.check_conversation_id, value) is None:
        assert 1 <= len(value) <= 128 and value.isascii() and " " not in value
    if verdict(v.check_client_message_id, value) is None:
        assert 1 <= len(value) <= v.MAX_CLIENT_MESSAGE_ID and value.isprintable()
        assert value == value.strip()
    if verdict(v.check_agent_id, value) is None:
        assert value == value.strip() and value.isprintable()


@FUZZ
@given(hostile_text, st.integers(min_value=1, max_value=10_000))
def test_message_text(text: str, max_bytes: int) -> None:
    if verdict(v.check_text, text, max_bytes) is None:
        assert text.strip() and len(text.encode()) <= max_bytes
        assert not any((ord(c) < 0x20 and c not in "\t\n\r") or ord(c) == 0x7F for c in text)


@FUZZ
@given(st.dictionaries(hostile_text, hostile_text, max_size=40), st.integers(min_value=0, max_value=40))
def test_metadata(metadata: dict[str, str], max_entries: int) -> None:
    if verdict(v.check_metadata, metadata, max_entries) is None:
        assert len(metadata) <= max_entries
        assert all(
            0 < len(k) <= v.MAX_METADATA_KEY and len(val) <= v.MAX_METADATA_VALUE
            for k, val in metadata.items()
        )


@FUZZ
@given(st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_scores(score: int) -> None:
    assert (verdict(v.check_score, score) is None) == (1 <= score <= 5)


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_request_or_a_precise_refusal(data: bytes) -> None:
    parsed = _deserializer(chat_pb2.SendMessageRequest)(data)
    if isinstance(parsed, v.MalformedRequest):
        refusal = parsed.rejection()
        assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT and "SendMessageRequest" in refusal.message
    else:
        assert isinstance(parsed, chat_pb2.SendMessageRequest)


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_are_an_event_or_an_event_decode_error(data: bytes) -> None:
    try:
        event = decode_event(data)
    except EventDecodeError:
        return
    assert event.event_id and event.conversation_id and event.WhichOneof("payload")


@FUZZ
@given(hostile_text, hostile_text, hostile_text, st.binary(max_size=64))
def test_events_round_trip(tenant: str, conversation: str, text: str, junk: bytes) -> None:
    conversation = conversation or "c"
    event = new_event(
        tenant,
        conversation,
        message_received=events_pb2.MessageReceived(client_message_id="m", text=text),
    )
    data = encode_event(event)
    assert decode_event(data) == event
    assert encode_event(decode_event(data)) == data  # deterministic
    # A prefix of junk either fails to decode or decodes to something complete, never crashes.
    try:
        decode_event(junk + data)
    except EventDecodeError:
        pass


@FUZZ
@given(hostile_text)
def test_key_parsers_never_raise(text: str) -> None:
    parsed = parse_token(text)
    if parsed is not None:
        assert text == f"sbk_{parsed[0]}_{parsed[1]}"
    token = bearer_token([("authorization", text)])
    assert token is not None
    assert bearer_token([("authorization", text.encode("utf-8", "surrogatepass"))]) is not None


@FUZZ
@given(
    st.binary(max_size=500)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
        max_leaves=20,
    ).map(lambda doc: json.dumps(doc).encode())
    | st.fixed_dictionaries(
        {
            "type": st.sampled_from(["tenant", "key", "other"]),
            "status": st.sampled_from(["active", "revoked", "x"]),
        },
        optional={
            "tenant_id": st.text(max_size=5),
            "key_id": st.text(max_size=5),
            "roles": st.lists(st.text(max_size=5)),
        },
    ).map(lambda doc: json.dumps(doc).encode())
)
def test_tenant_records_are_records_or_value_errors(data: bytes) -> None:
    # The follower skips what raises ValueError; anything else would stop an ingress.
    try:
        record = decode_record(data)
    except ValueError:
        return
    assert isinstance(record, TenantRecord | KeyRecord)
