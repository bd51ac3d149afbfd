"""AgentService's pure decisions: who may accept, who holds a conversation, queue order."""

from __future__ import annotations

import grpc
import pytest

from services.ingress import RequestRejected
from services.ingress import _agents as a
from services.ingress import _validation as v
from streams.sessions import ConversationState

WAITING = ConversationState(
    tenant_id="acme", conversation_id="c1", mode="agent", queue="general", handoff_count=1, handoff_reason="x"
)


def test_a_waiting_conversation_can_be_accepted() -> None:
    a.refuse_accept(WAITING, "c1", "alice")


def test_accepting_needs_agent_mode_and_a_queue() -> None:
    for state in (None, ConversationState("acme", "c1"), ConversationState("acme", "c1", mode="agent")):
        with pytest.raises(RequestRejected) as info:
            a.refuse_accept(state, "c1", "alice")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_loser_learns_who_won() -> None:
    taken = ConversationState("acme", "c1", mode="agent", assignee="bob", handoff_count=1)
    with pytest.raises(RequestRejected, match="already accepted by 'bob'") as info:
        a.refuse_accept(taken, "c1", "alice")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    a.refuse_accept(taken, "c1", "bob")  # the winner's retry


def test_the_holder_is_the_assignee_or_the_accept_not_folded_yet() -> None:
    assert a.holder(WAITING, "alice") == "alice"
    assert a.holder(ConversationState("acme", "c1", mode="agent", assignee="bob"), "alice") == "bob"
    assert a.holder(ConversationState("acme", "c1"), "alice") == ""
    assert a.holder(None, "alice") == ""


def test_each_handoff_has_its_own_accept_key() -> None:
    assert a.accept_key("acme", "c1", 1) != a.accept_key("acme", "c1", 2)
    assert a.accept_key("acme", "c1", 1).startswith("sb:{acme:c1}:")  # the conversation's slot


def test_queues_oldest_first_across_queues() -> None:
    waiting = [a.Waiting("c3", "vip", 30), a.Waiting("c1", "general", 10), a.Waiting("c2", "vip", 20)]
    assert [w.conversation_id for w in a.oldest_first(waiting, 2)] == ["c1", "c2"]
    assert a.queue_of_key("acme", a.queue_pattern("acme").replace("*", "vip")) == "vip"


def test_scores_and_agent_ids() -> None:
    for good in (1, 5):
        v.check_score(good)
    for bad in (0, 6):
        with pytest.raises(RequestRejected, match="1 \\(worst\\) to 5"):
            v.check_score(bad)
    v.check_agent_id("agent-7@acme")
    for bad_id in ("", " x", "a\nb", "x" * 129):
        with pytest.raises(RequestRejected):
            v.check_agent_id(bad_id)
    with pytest.raises(RequestRejected):
        v.check_queue("vip queue")
