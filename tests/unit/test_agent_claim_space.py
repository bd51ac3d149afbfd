"""Agents' messages have a client_message_id space of their own (hotview.agent_claim), in the fold
and in the claims the sessions worker rebuilds; an agent message without one is never a duplicate."""

from switchboard.v1 import events_pb2

from schemas import hotview as hv
from schemas.events import Event, LogPosition, new_event
from streams.sessions import fold_event
from streams.sessions._worker import _claim_of


def agent_message(cmid: str, text: str) -> Event:
    return new_event(
        "acme",
        "c1",
        agent_message_sent=events_pb2.AgentMessageSent(agent_id="bob", client_message_id=cmid, text=text),
    )


def test_agent_messages_without_a_client_message_id_are_each_counted() -> None:
    # The event contract does not require the id (only the ingress's validation does): two
    # different agent messages without one are two messages, as they were before the id space.
    events = [
        new_event("acme", "c1", conversation_started=events_pb2.ConversationStarted(customer_id="c")),
        agent_message("", "first"),
        agent_message("", "second"),
    ]
    state = None
    for offset, event in enumerate(events):
        state = fold_event(state, event, LogPosition(0, offset)).state
    assert state is not None
    assert (state.agent_message_count, state.message_count) == (2, 2)
    # ...and no claim is rebuilt for them (a retry without an id cannot look one up).
    assert _claim_of(events[1]) == ""


def test_an_agent_message_id_is_claimed_and_deduplicated_in_the_agents_space() -> None:
    assert _claim_of(agent_message("7", "hi")) == hv.agent_claim("7")
    first = agent_message("7", "hi")
    state = fold_event(None, first, LogPosition(0, 0)).state
    # The same agent message written twice (its ack lost) counts once.
    again = fold_event(state, agent_message("7", "hi"), LogPosition(0, 1))
    assert not again.applied and again.state.agent_message_count == 1
