"""Live-stream entries leave out the ids their stream's key has; readers put them back."""

import pytest
from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event, decode_event, encode_event, new_event


def events(tenant: str, conversation: str) -> list[Event]:
    traced = new_event(
        tenant,
        conversation,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        message_received=events_pb2.MessageReceived(client_message_id="m1", text="我的订单在哪里"),
    )
    return [
        new_event(tenant, conversation, conversation_started=events_pb2.ConversationStarted(customer_id="c")),
        traced,
        new_event(
            tenant,
            conversation,
            causation_id=traced.event_id,
            reply_generated=events_pb2.ReplyGenerated(message_event_id=traced.event_id, text="hi"),
        ),
        new_event(tenant, conversation, conversation_closed=events_pb2.ConversationClosed()),
    ]


@pytest.mark.parametrize(
    ("tenant", "conversation"),
    [
        ("acme", "01a22dc6-be39-7362-989e-8273efa67644"),
        ("租户", "会话-1\n"),
        # Past one-byte length prefixes: kept whole, read the same.
        ("t" * 200, "c" * 127),
        ("t", "c" * 300),
    ],
)
def test_an_entry_read_back_is_the_event_written(tenant: str, conversation: str) -> None:
    suffix = hv.live_event_suffix(tenant, conversation)
    for event in events(tenant, conversation):
        value = encode_event(event)
        stored = hv.compact_live_event(value)
        assert decode_event(stored + suffix) == event
        # An entry written whole (by the version before this layout) reads the same.
        assert decode_event(value + suffix) == event


def test_the_entry_leaves_out_the_tenant_and_conversation_ids() -> None:
    tenant, conversation = "acme", "01a22dc6-be39-7362-989e-8273efa67644"
    for event in events(tenant, conversation):
        value = encode_event(event)
        stored = hv.compact_live_event(value)
        assert len(stored) == len(value) - len(hv.live_event_suffix(tenant, conversation))
        assert conversation.encode() not in stored
        parsed = events_pb2.Event.FromString(stored)
        assert (parsed.tenant_id, parsed.conversation_id) == ("", "")
        assert parsed.event_id == event.event_id


def test_what_is_not_an_event_in_the_usual_layout_is_kept_as_it_is() -> None:
    for value in (
        b"",
        b"\x0a",
        b"\x12\x04acme",
        b"\x0a\x02id\x22\x00",
        b"\x0a\x05ab",
        b"\x0a\x02id\x12\x09ac",
    ):
        assert hv.compact_live_event(value) == value
