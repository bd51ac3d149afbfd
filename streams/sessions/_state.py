"""Conversation state and its fold over the event log. Pure: no I/O, no clocks, no randomness."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from schemas.events import Event, LogPosition, event_type

STATUS_OPEN = "open"
STATUS_CLOSED = "closed"
MODE_BOT = "bot"
MODE_AGENT = "agent"

# How many recent client_message_ids a conversation remembers to drop redelivered duplicates
# (a retry whose first ack was lost). The ingress deduplicates first; this is the backstop.
DEDUP_WINDOW = 64


@dataclass(frozen=True, slots=True)
class ConversationState:
    tenant_id: str
    conversation_id: str
    status: str = STATUS_OPEN
    mode: str = MODE_BOT
    assignee: str = ""
    channel: int = 0
    customer_id: str = ""
    locale: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at_ns: int = 0
    updated_at_ns: int = 0
    closed_at_ns: int = 0
    resolution: str = ""
    # Every message in the conversation (customer, bot, agent) after deduplication.
    message_count: int = 0
    customer_message_count: int = 0
    bot_message_count: int = 0
    agent_message_count: int = 0
    handoff_count: int = 0
    event_count: int = 0
    csat_score: int = 0
    last_intent: str = ""
    # Where a handed-off conversation waits (empty once an agent accepted it or it went back).
    queue: str = ""
    handoff_reason: str = ""
    handoff_at_ns: int = 0
    # Customer messages the assistant has decided on (intent, reply or handoff), recent ones:
    # decisions carry deterministic ids, and one redelivered after a crash is applied once.
    recent_decisions: tuple[str, ...] = ()
    # Where the last applied event sits in the log: anything at or before it is a redelivery.
    last_partition: int = -1
    last_offset: int = -1
    last_event_id: str = ""
    recent_client_message_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # A plain field copy: dataclasses.asdict deep-copies and was the worker's top cost.
        data = {name: getattr(self, name) for name in _FIELDS}
        data["metadata"] = dict(self.metadata)
        data["recent_client_message_ids"] = list(self.recent_client_message_ids)
        data["recent_decisions"] = list(self.recent_decisions)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["recent_client_message_ids"] = tuple(known.get("recent_client_message_ids", ()))
        known["recent_decisions"] = tuple(known.get("recent_decisions", ()))
        return cls(**known)


_FIELDS = tuple(f.name for f in fields(ConversationState))


@dataclass(frozen=True, slots=True)
class FoldResult:
    state: ConversationState
    # False when the event was a redelivery or a duplicate message and changed nothing.
    applied: bool
    # 1-based message sequence when the event added a message to the conversation.
    message_sequence: int = 0


def _is_redelivery(state: ConversationState, position: LogPosition, event: Event) -> bool:
    if state.last_event_id == event.event_id:
        return True
    return state.last_partition == position.partition and position.offset <= state.last_offset


def decision_key(event: Event) -> str:
    """What a decision event decides, e.g. ``reply:<message event id>``; empty for other events.
    The assistant derives its event ids from the same pair, so a decision written twice (a crash
    between its write and its commit) has one key and one id."""
    kind = event_type(event)
    if kind == "intent_classified":
        return f"intent:{event.intent_classified.message_event_id}"
    if kind == "reply_generated" and event.reply_generated.message_event_id:
        return f"reply:{event.reply_generated.message_event_id}"
    if kind == "handoff_requested" and event.handoff_requested.message_event_id:
        return f"handoff:{event.handoff_requested.message_event_id}"
    return ""


def _with_message(state: ConversationState, client_message_id: str, **changes: Any) -> ConversationState:
    recent = state.recent_client_message_ids
    if client_message_id:
        recent = (*recent, client_message_id)[-DEDUP_WINDOW:]
    return replace(state, message_count=state.message_count + 1, recent_client_message_ids=recent, **changes)


def fold_event(state: ConversationState | None, event: Event, position: LogPosition) -> FoldResult:
    """Apply one event to a conversation's state; applying the same event again changes nothing."""
    if state is None:
        state = ConversationState(tenant_id=event.tenant_id, conversation_id=event.conversation_id)
    if _is_redelivery(state, position, event):
        return FoldResult(state, applied=False)

    occurred_ns = event.occurred_at.ToNanoseconds()
    kind = event_type(event)
    new = state
    sequence = 0
    decided = decision_key(event)
    if decided:
        if decided in state.recent_decisions:
            return FoldResult(_advance(state, event, position, occurred_ns, count=False), applied=False)
        state = replace(state, recent_decisions=(*state.recent_decisions, decided)[-DEDUP_WINDOW:])
        new = state

    if kind == "conversation_started":
        started = event.conversation_started
        new = replace(
            state,
            channel=int(started.channel),
            customer_id=started.customer_id,
            locale=started.locale,
            metadata=dict(started.metadata),
            created_at_ns=state.created_at_ns or occurred_ns,
        )
    elif kind in ("message_received", "agent_message_sent") and state.status == STATUS_CLOSED:
        # A message that raced the close (from another ingress replica) and lost: the
        # conversation is over; it is not counted.
        return FoldResult(_advance(state, event, position, occurred_ns, count=False), applied=False)
    elif kind in ("message_received", "agent_message_sent"):
        cmid = (
            event.message_received.client_message_id
            if kind == "message_received"
            else event.agent_message_sent.client_message_id
        )
        if cmid and cmid in state.recent_client_message_ids:
            # Same client message written twice (its first ack was lost): count it once.
            return FoldResult(_advance(state, event, position, occurred_ns, count=False), applied=False)
        if kind == "message_received":
            new = _with_message(state, cmid, customer_message_count=state.customer_message_count + 1)
        else:
            new = _with_message(
                state,
                cmid,
                agent_message_count=state.agent_message_count + 1,
                assignee=state.assignee or event.agent_message_sent.agent_id,
            )
        sequence = new.message_count
    elif kind == "reply_generated":
        new = _with_message(state, "", bot_message_count=state.bot_message_count + 1)
        sequence = new.message_count
    elif kind == "intent_classified":
        new = replace(state, last_intent=event.intent_classified.intent)
    elif kind == "handoff_requested":
        handoff = event.handoff_requested
        new = replace(
            state,
            mode=MODE_AGENT,
            handoff_count=state.handoff_count + 1,
            assignee="",
            queue=handoff.queue or "general",
            handoff_reason=handoff.reason,
            handoff_at_ns=occurred_ns,
        )
    elif kind == "agent_assigned":
        new = replace(state, mode=MODE_AGENT, assignee=event.agent_assigned.agent_id, queue="")
    elif kind == "returned_to_bot":
        new = replace(state, mode=MODE_BOT, assignee="", queue="")
    elif kind == "conversation_closed":
        new = replace(
            state,
            status=STATUS_CLOSED,
            resolution=event.conversation_closed.resolution,
            closed_at_ns=state.closed_at_ns or occurred_ns,
        )
    elif kind == "csat_rated":
        new = replace(state, csat_score=int(event.csat_rated.score))

    return FoldResult(_advance(new, event, position, occurred_ns), applied=True, message_sequence=sequence)


def _advance(
    state: ConversationState, event: Event, position: LogPosition, occurred_ns: int, *, count: bool = True
) -> ConversationState:
    return replace(
        state,
        tenant_id=state.tenant_id or event.tenant_id,
        updated_at_ns=max(state.updated_at_ns, occurred_ns),
        event_count=state.event_count + (1 if count else 0),
        last_partition=position.partition,
        last_offset=position.offset,
        last_event_id=event.event_id,
    )
