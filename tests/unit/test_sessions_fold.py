from dataclasses import replace

import pytest
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


def test_the_bots_answer_or_hand_off_after_the_close_is_not_counted_or_queued():
    """A decision sent in the instant the close was published lands after it (a walkthrough saw
    closed conversations with a message count grown by the reply, and in agent mode)."""
    reply = new_event(
        "acme", "c1", reply_generated=events_pb2.ReplyGenerated(message_event_id="m", text="hi")
    )
    handoff = new_event("acme", "c1", handoff_requested=events_pb2.HandoffRequested(queue="general"))
    intent = new_event("acme", "c1", intent_classified=events_pb2.IntentClassified(intent="refund"))
    before = fold_all([started(), message("a"), closed()])
    state = fold_all([started(), message("a"), closed(), intent, reply, handoff])
    assert state.last_intent == before.last_intent and state.event_count == before.event_count
    assert state.status == STATUS_CLOSED and state.message_count == 1 and state.bot_message_count == 0
    assert state.mode == "bot" and state.handoff_count == 0 and state.queue == ""
    # Before the close they count as ever.
    state = fold_all([started(), message("a"), reply, handoff, closed()])
    assert state.bot_message_count == 1 and state.mode == "agent" and state.handoff_count == 1


def test_a_second_start_or_close_of_a_conversation_changes_nothing():
    """A retry can take over the start or close claim of an ingress process that had only stalled;
    its own record may land later, a second start or close: the first stands."""
    first = fold_all([started(), message("a")])
    late_start = new_event(
        "acme", "c1", conversation_started=events_pb2.ConversationStarted(customer_id="someone-else")
    )
    again = fold_event(first, late_start, LogPosition(0, 2))
    assert not again.applied
    assert again.state.customer_id == "cust-9" and again.state.metadata == {"plan": "pro"}
    assert again.state.event_count == first.event_count
    closed_once = fold_all([started(), message("a"), closed()])
    late_close = new_event(
        "acme", "c1", conversation_closed=events_pb2.ConversationClosed(resolution="late copy")
    )
    twice = fold_event(closed_once, late_close, LogPosition(0, 3))
    assert not twice.applied
    assert twice.state.resolution == "solved" and twice.state.closed_at_ns == closed_once.closed_at_ns


def test_a_decision_written_twice_is_applied_once():
    from schemas.events import new_event as ne

    # Decision ids are derived from what they decide (assistant decision_basis): a decision written
    # twice (a crash between its write and its commit, or the two copies of a message written
    # twice) comes back with the same id, maybe after other events.
    reply = ne("acme", "c1", reply_generated=events_pb2.ReplyGenerated(message_event_id="m-1", text="hi"))
    again = Event()
    again.CopyFrom(reply)
    state = fold_all([started(), message("a"), reply, message("b"), again])
    assert state.bot_message_count == 1 and state.message_count == 3


def conversation_with_everything() -> list[Event]:
    from schemas.events import new_event as ne

    return [
        started(),
        message("a", 'quotes " and \\ and 中文'),
        ne(
            "acme",
            "c1",
            intent_classified=events_pb2.IntentClassified(message_event_id="m-1", intent="refund"),
        ),
        ne("acme", "c1", handoff_requested=events_pb2.HandoffRequested(queue="billing", reason="asked")),
        ne("acme", "c1", agent_assigned=events_pb2.AgentAssigned(agent_id="bob", queue="billing")),
        ne(
            "acme",
            "c1",
            agent_message_sent=events_pb2.AgentMessageSent(agent_id="bob", client_message_id="x"),
        ),
        ne("acme", "c1", returned_to_bot=events_pb2.ReturnedToBot(agent_id="bob")),
        ne("acme", "c1", csat_rated=events_pb2.CsatRated(score=4)),
        closed(),
    ]


def test_the_workers_in_place_fold_is_the_pure_fold() -> None:
    from streams.sessions._state import Fold

    events = conversation_with_everything() + [message(f"m{i}") for i in range(70)]
    fold = Fold.new("acme", "c1")
    state = None
    for offset, event in enumerate(events):
        result = fold_event(state, event, LogPosition(1, offset))
        state = result.state
        assert fold.apply(event, LogPosition(1, offset)) == (result.applied, result.message_sequence)
        assert fold.freeze() == state
    # Redelivered: nothing changes.
    assert fold.apply(events[3], LogPosition(1, 3)) == (False, 0)
    assert fold.freeze() == state


def test_the_workers_json_is_the_documents_json_character_for_character() -> None:
    import json

    from streams.sessions._state import Fold

    fold = Fold.new('tenant "q"', "会话-1\n")
    assert fold.json_text() == json.dumps(fold.to_json(), ensure_ascii=False)
    for offset, event in enumerate([*conversation_with_everything(), *(message(f"m{i}") for i in range(70))]):
        fold.apply(event, LogPosition(0, offset))
        text = fold.json_text()
        assert text == json.dumps(fold.to_json(), ensure_ascii=False)
        assert Fold.from_json(json.loads(text)).freeze() == fold.freeze()
    assert ConversationState.from_json(json.loads(fold.json_text())) == fold.freeze()


def test_an_event_the_fold_cannot_apply_leaves_the_state_as_it_was() -> None:
    from streams.sessions._state import Fold

    class Hostile:
        """An event whose payload cannot be read (the worker dead-letters it)."""

        event_id = "e-hostile"
        tenant_id = "acme"
        conversation_id = "c1"
        occurred_at = started().occurred_at

        def WhichOneof(self, _: str) -> str:
            return "conversation_closed"

        @property
        def conversation_closed(self) -> object:
            raise ValueError("unreadable payload")

    fold = Fold.new("acme", "c1")
    fold.apply(started(), LogPosition(0, 0))
    fold.apply(message("a"), LogPosition(0, 1))
    before = fold.freeze()
    with pytest.raises(ValueError):
        fold.apply(Hostile(), LogPosition(0, 2))  # type: ignore[arg-type]
    assert fold.freeze() == before


def test_the_dedup_window_is_the_last_64_client_message_ids() -> None:
    from streams.sessions._state import DEDUP_WINDOW

    events = [started(), *(message(f"id-{i}") for i in range(DEDUP_WINDOW + 1))]
    state = fold_all(events)
    assert state.message_count == DEDUP_WINDOW + 1
    assert len(state.recent_message_digests) == DEDUP_WINDOW * 8
    # id-1 is the oldest the window holds; id-0 fell out of it.
    again = fold_event(state, message("id-1"), LogPosition(0, len(events)))
    assert not again.applied and again.state.message_count == state.message_count
    older = fold_event(state, message("id-0"), LogPosition(0, len(events)))
    assert older.applied and older.state.message_count == state.message_count + 1


def test_a_state_written_with_the_ids_in_full_is_read_and_written_back_with_digests() -> None:
    """Redis keeps states written by the version before the digests (the ids themselves)."""
    import json

    from streams.sessions._state import Fold

    state = fold_all([started(), message("a"), message("b")])
    old = state.to_json()
    del old["recent_message_digests"]
    old["recent_client_message_ids"] = ["a", "b"]
    for read in (ConversationState.from_json(old), Fold.from_json(old).freeze()):
        assert read == state
        retry = fold_event(read, message("a"), LogPosition(0, 3))
        assert not retry.applied and retry.state.message_count == 2
    fold = Fold.from_json(json.loads(json.dumps(old)))
    written = json.loads(fold.json_text())
    assert "recent_client_message_ids" not in written
    assert ConversationState.from_json(written) == state


def test_the_stored_document_leaves_out_the_fields_at_their_defaults() -> None:
    import json

    from streams.sessions._state import Fold

    state = fold_all([started(), message("a")])
    document = json.loads(Fold(state).json_text())
    assert "assignee" not in document and "resolution" not in document and "recent_decisions" not in document
    assert document["status"] == STATUS_OPEN and document["mode"] == "bot"  # always there
    assert document["message_count"] == 1 and document["customer_id"] == "cust-9"
    assert ConversationState.from_json(document) == state
    closed_document = json.loads(Fold(fold_all([started(), closed()])).json_text())
    assert closed_document["status"] == STATUS_CLOSED
