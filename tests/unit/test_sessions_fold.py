from dataclasses import replace

from switchboard.v1 import events_pb2

from schemas.events import Event, LogPosition, new_event
from streams.sessions import STATUS_CLOSED, STATUS_OPEN, ConversationState, fold_event


def started() -> Event:
    return new_event(
        "acme",
        "c1",
        conversation_started=events_pb2.ConversationStarted(
            channel=events_pb2.CHANNEL_IOS, customer_id="cust-9", metadata={"plan": "pro"}
        ),
    )


def message(cmid: str, text: str = "hello") -> Event:
    return new_event(
        "acme", "c1", message_received=events_pb2.MessageReceived(client_message_id=cmid, text=text)
    )


def closed() -> Event:
    return new_event("acme", "c1", conversation_closed=events_pb2.ConversationClosed(resolution="solved"))


def fold_all(events: list[Event], start: int = 0) -> ConversationState:
    state = None
    for offset, event in enumerate(events, start=start):
        state = fold_event(state, event, LogPosition(0, offset)).state
    assert state is not None
    return state


def test_conversation_lifecycle():
    state = fold_all([started(), message("a"), message("b", "我的订单在哪里"), closed()])
    assert state.status == STATUS_CLOSED
    assert state.resolution == "solved"
    assert state.channel == events_pb2.CHANNEL_IOS
    assert state.customer_id == "cust-9"
    assert state.metadata == {"plan": "pro"}
    assert state.message_count == 2
    assert state.customer_message_count == 2
    assert state.event_count == 4
    assert state.last_offset == 3
    assert state.created_at_ns > 0 and state.closed_at_ns >= state.created_at_ns


def test_same_event_twice_gives_the_same_state():
    events = [started(), message("a"), message("b")]
    state = fold_all(events)
    again = fold_event(state, events[-1], LogPosition(0, 2))
    assert not again.applied
    assert again.state == state
    # A whole batch redelivered after a crash changes nothing either.
    assert fold_all(events) == state
    redelivered = state
    for offset, event in enumerate(events):
        redelivered = fold_event(redelivered, event, LogPosition(0, offset)).state
    assert redelivered == state


def test_retried_client_message_counts_once():
    state = fold_all([started(), message("a"), message("a")])
    assert state.message_count == 1
    assert state.event_count == 2
    assert state.last_offset == 2


def test_message_sequence_numbers_follow_the_log():
    state = None
    sequences = []
    for offset, event in enumerate([started(), message("a"), message("b"), message("c")]):
        result = fold_event(state, event, LogPosition(3, offset))
        state = result.state
        sequences.append(result.message_sequence)
    assert sequences == [0, 1, 2, 3]


def test_state_survives_json_round_trip():
    state = fold_all([started(), message("a"), message("b")])
    assert ConversationState.from_json(state.to_json()) == state


def test_open_until_closed_and_unknown_fields_ignored():
    state = fold_all([started(), message("x")])
    assert state.status == STATUS_OPEN
    data = state.to_json() | {"field_from_the_future": 1}
    assert ConversationState.from_json(data) == state
    assert replace(state, status=STATUS_CLOSED).status == STATUS_CLOSED


def test_a_message_after_the_close_is_not_counted():
    state = fold_all([started(), message("a"), closed(), message("late")])
    assert state.status == STATUS_CLOSED and state.message_count == 1


def test_a_decision_written_twice_is_applied_once():
    from schemas.events import new_event as ne

    reply = ne("acme", "c1", reply_generated=events_pb2.ReplyGenerated(message_event_id="m-1", text="hi"))
    again = Event()
    again.CopyFrom(reply)
    again.event_id = "another-id-same-decision"
    state = fold_all([started(), message("a"), reply, again])
    assert state.bot_message_count == 1 and state.message_count == 2
