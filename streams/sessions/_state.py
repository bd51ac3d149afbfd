"""Conversation state and its fold over the event log. Pure: no I/O, no clocks, no randomness."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from dataclasses import dataclass, field, fields
from json.encoder import encode_basestring as _js
from typing import Any

from schemas import hotview as hv
from schemas.events import Event, LogPosition, event_type

STATUS_OPEN = "open"
STATUS_CLOSED = "closed"
MODE_BOT = "bot"
MODE_AGENT = "agent"

# How many recent client_message_ids a conversation remembers to drop redelivered duplicates
# (a retry whose first ack was lost). The ingress deduplicates first; this is the backstop.
DEDUP_WINDOW = 64
# Each remembered as an 8-byte digest of the id, not the id: a window of 64 UUIDs was ~11 KB of
# the worker's memory per conversation (each id held raw and JSON-encoded) and ~2.5 KB of its
# state in Redis; digests are 512 bytes and ~700 characters of base64. Two different ids of one
# conversation share a digest with probability ~2^-64 per pair.
DIGEST_BYTES = 8
_WINDOW_BYTES = DEDUP_WINDOW * DIGEST_BYTES


def message_digest(client_message_id: str) -> bytes:
    """What the dedup window keeps of a client_message_id."""
    return hashlib.blake2b(client_message_id.encode(), digest_size=DIGEST_BYTES).digest()


def _holds(window: bytes, digest: bytes) -> bool:
    """Whether the window (digests end to end) has this one at a digest boundary."""
    at = window.find(digest)
    while at >= 0:
        if at % DIGEST_BYTES == 0:
            return True
        at = window.find(digest, at + 1)
    return False


def _window_of(data: dict[str, Any]) -> bytes:
    """The dedup window of a stored state: its digests (base64), or, in a state written before
    them, its ids in full, digested here (it is written back with digests)."""
    encoded = data.get("recent_message_digests")
    if encoded is not None:
        return base64.b64decode(encoded)
    ids = data.get("recent_client_message_ids") or ()
    return b"".join(message_digest(m) for m in list(ids)[-DEDUP_WINDOW:])


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
    # The recent client_message_ids' digests (`message_digest`), oldest first, end to end.
    recent_message_digests: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return _document(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConversationState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["recent_decisions"] = tuple(known.get("recent_decisions", ()))
        known["recent_message_digests"] = _window_of(data)
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
    """What a decision event decides, e.g. ``reply:<decision event id>``; empty for other events.
    The assistant derives a decision's event id from its kind and the message it is about (the
    client's message, however many times it was written: assistant `decision_basis`), so a
    decision written twice (a crash between its write and its commit, or the two copies of a
    message written twice) has one id, and one key. (Before 2026-12-01 the key named the
    message's event id; a batch re-applied across that upgrade may be counted twice.)"""
    kind = event_type(event)
    if kind == "intent_classified":
        return f"intent:{event.event_id}"
    if kind == "reply_generated" and event.reply_generated.message_event_id:
        return f"reply:{event.event_id}"
    if kind == "handoff_requested" and event.handoff_requested.message_event_id:
        return f"handoff:{event.event_id}"
    return ""


class Fold:
    """A conversation's state while the sessions worker folds a batch into it: mutable, so applying
    an event changes a few attributes instead of copying all 34 fields two or three times
    (`dataclasses.replace` was most of the fold's cost). `fold_event` is the same fold on a copy.

    `apply` reads everything it needs from the event before it changes anything, so an event that
    makes it raise (to be dead-lettered) leaves the state as it was."""

    __slots__ = _FIELDS

    # Set by the loops below (slots, no class-level defaults); declared for the type checker.
    tenant_id: str
    conversation_id: str
    status: str
    mode: str
    assignee: str
    channel: int
    customer_id: str
    locale: str
    metadata: dict[str, str]
    created_at_ns: int
    updated_at_ns: int
    closed_at_ns: int
    resolution: str
    message_count: int
    customer_message_count: int
    bot_message_count: int
    agent_message_count: int
    handoff_count: int
    event_count: int
    csat_score: int
    last_intent: str
    queue: str
    handoff_reason: str
    handoff_at_ns: int
    recent_decisions: tuple[str, ...]
    last_partition: int
    last_offset: int
    last_event_id: str
    recent_message_digests: bytes

    def __init__(self, state: ConversationState) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(state, name))
        self.metadata = dict(state.metadata)

    @classmethod
    def new(cls, tenant_id: str, conversation_id: str) -> Fold:
        # A worker holds thousands of states of a few tenants: one copy of each tenant id.
        return cls(ConversationState(tenant_id=sys.intern(tenant_id), conversation_id=conversation_id))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fold:
        fold = cls.__new__(cls)
        for name, default in _DEFAULTS:
            setattr(fold, name, data.get(name, default))
        fold.tenant_id = sys.intern(fold.tenant_id)
        fold.metadata = dict(fold.metadata)
        fold.recent_decisions = tuple(fold.recent_decisions)
        fold.recent_message_digests = _window_of(data)
        return fold

    def freeze(self) -> ConversationState:
        return ConversationState(**{name: getattr(self, name) for name in _FIELDS})

    def to_json(self) -> dict[str, Any]:
        """The same document as `ConversationState.to_json` (readers parse either)."""
        return _document(self)

    def json_text(self) -> str:
        """`json.dumps(self.to_json(), ensure_ascii=False)`, character for character, at a
        fraction of its cost: the worker writes it once per conversation per batch."""
        parts = [
            f'{{"tenant_id": {_js(self.tenant_id)}, "conversation_id": {_js(self.conversation_id)}, '
            f'"status": {_js(self.status)}, "mode": {_js(self.mode)}'
        ]
        add = parts.append
        if self.assignee:
            add(f'"assignee": {_js(self.assignee)}')
        if self.channel:
            add(f'"channel": {self.channel}')
        if self.customer_id:
            add(f'"customer_id": {_js(self.customer_id)}')
        if self.locale:
            add(f'"locale": {_js(self.locale)}')
        if self.metadata:
            add(f'"metadata": {json.dumps(self.metadata, ensure_ascii=False)}')
        if self.created_at_ns:
            add(f'"created_at_ns": {self.created_at_ns}')
        if self.updated_at_ns:
            add(f'"updated_at_ns": {self.updated_at_ns}')
        if self.closed_at_ns:
            add(f'"closed_at_ns": {self.closed_at_ns}')
        if self.resolution:
            add(f'"resolution": {_js(self.resolution)}')
        if self.message_count:
            add(f'"message_count": {self.message_count}')
        if self.customer_message_count:
            add(f'"customer_message_count": {self.customer_message_count}')
        if self.bot_message_count:
            add(f'"bot_message_count": {self.bot_message_count}')
        if self.agent_message_count:
            add(f'"agent_message_count": {self.agent_message_count}')
        if self.handoff_count:
            add(f'"handoff_count": {self.handoff_count}')
        if self.event_count:
            add(f'"event_count": {self.event_count}')
        if self.csat_score:
            add(f'"csat_score": {self.csat_score}')
        if self.last_intent:
            add(f'"last_intent": {_js(self.last_intent)}')
        if self.queue:
            add(f'"queue": {_js(self.queue)}')
        if self.handoff_reason:
            add(f'"handoff_reason": {_js(self.handoff_reason)}')
        if self.handoff_at_ns:
            add(f'"handoff_at_ns": {self.handoff_at_ns}')
        if self.recent_decisions:
            add(f'"recent_decisions": [{", ".join(map(_js, self.recent_decisions))}]')
        if self.last_partition != -1:
            add(f'"last_partition": {self.last_partition}')
        if self.last_offset != -1:
            add(f'"last_offset": {self.last_offset}')
        if self.last_event_id:
            add(f'"last_event_id": {_js(self.last_event_id)}')
        if self.recent_message_digests:
            add(f'"recent_message_digests": "{_b64(self.recent_message_digests)}"')
        return ", ".join(parts) + "}"

    def apply(self, event: Event, position: LogPosition) -> tuple[bool, int]:
        """Apply one event; (applied, 1-based message sequence or 0). A redelivery or a duplicate
        changes nothing but the log position; applying the same event again changes nothing."""
        if self.last_event_id == event.event_id or (
            self.last_partition == position.partition and position.offset <= self.last_offset
        ):
            return False, 0
        ts = event.occurred_at
        occurred_ns = ts.seconds * 1_000_000_000 + ts.nanos
        kind = event.WhichOneof("payload") or ""
        decided = decision_key(event)
        if decided and decided in self.recent_decisions:
            self._advance(event, position, occurred_ns, count=False)
            return False, 0
        sequence = 0
        if self.status == STATUS_CLOSED and kind in (
            "reply_generated",
            "handoff_requested",
            "intent_classified",
        ):
            # The bot's answer to a message of the last instant before the close, sent as the
            # close was published (streams/assistant: the bot checks the close's hold before it
            # sends): the conversation is over; not counted, not queued for an agent.
            self._advance(event, position, occurred_ns, count=False)
            return False, 0
        if kind == "message_received" or kind == "agent_message_sent":
            if self.status == STATUS_CLOSED:
                # A message that raced the close (from another ingress replica) and lost: the
                # conversation is over; it is not counted.
                self._advance(event, position, occurred_ns, count=False)
                return False, 0
            if kind == "message_received":
                cmid = event.message_received.client_message_id
                agent_id = ""
            else:
                sent = event.agent_message_sent
                # The agents' own id space (see hotview.agent_claim).
                cmid, agent_id = hv.agent_claim(sent.client_message_id), sent.agent_id
            digest = message_digest(cmid) if cmid else b""
            if digest and _holds(self.recent_message_digests, digest):
                # Same client message written twice (its first ack was lost): count it once.
                self._advance(event, position, occurred_ns, count=False)
                return False, 0
            if kind == "message_received":
                self.customer_message_count += 1
            else:
                self.agent_message_count += 1
                self.assignee = self.assignee or agent_id
            sequence = self._add_message(digest)
        elif kind == "conversation_started":
            if self.created_at_ns:
                # A second start of the conversation (a retry took over the claim of an ingress
                # process that had only stalled, and its own start landed too): the first stands.
                self._advance(event, position, occurred_ns, count=False)
                return False, 0
            started = event.conversation_started
            channel, customer_id, locale = int(started.channel), started.customer_id, started.locale
            metadata = dict(started.metadata)
            self.channel, self.customer_id, self.locale, self.metadata = (
                channel,
                customer_id,
                locale,
                metadata,
            )
            self.created_at_ns = self.created_at_ns or occurred_ns
        elif kind == "reply_generated":
            self.bot_message_count += 1
            sequence = self._add_message(b"")
        elif kind == "intent_classified":
            self.last_intent = event.intent_classified.intent
        elif kind == "handoff_requested":
            handoff = event.handoff_requested
            queue, reason = handoff.queue or "general", handoff.reason
            self.mode = MODE_AGENT
            self.handoff_count += 1
            self.assignee = ""
            self.queue, self.handoff_reason, self.handoff_at_ns = queue, reason, occurred_ns
        elif kind == "agent_assigned":
            self.assignee = event.agent_assigned.agent_id
            self.mode, self.queue = MODE_AGENT, ""
        elif kind == "returned_to_bot":
            self.mode, self.assignee, self.queue = MODE_BOT, "", ""
        elif kind == "conversation_closed":
            if self.status == STATUS_CLOSED:
                # A second close (the late copy of a close another process finished for a
                # stalled one, see ConversationWrites._finish_dead_close): the first stands.
                self._advance(event, position, occurred_ns, count=False)
                return False, 0
            self.resolution = event.conversation_closed.resolution
            self.status = STATUS_CLOSED
            self.closed_at_ns = self.closed_at_ns or occurred_ns
        elif kind == "csat_rated":
            self.csat_score = int(event.csat_rated.score)
        if decided:
            self.recent_decisions = (*self.recent_decisions, decided)[-DEDUP_WINDOW:]
        self._advance(event, position, occurred_ns)
        return True, sequence

    def _add_message(self, digest: bytes) -> int:
        if digest:
            self.recent_message_digests = (self.recent_message_digests + digest)[-_WINDOW_BYTES:]
        self.message_count += 1
        return self.message_count

    def _advance(self, event: Event, position: LogPosition, occurred_ns: int, *, count: bool = True) -> None:
        if not self.tenant_id:
            self.tenant_id = event.tenant_id
        if occurred_ns > self.updated_at_ns:
            self.updated_at_ns = occurred_ns
        if count:
            self.event_count += 1
        self.last_partition = position.partition
        self.last_offset = position.offset
        self.last_event_id = event.event_id


_DEFAULTS: tuple[tuple[str, Any], ...] = tuple(
    (f.name, {} if f.name == "metadata" else f.default) for f in fields(ConversationState)
)
# The stored document leaves out every field at its default (readers take the default for a field
# that is missing, as for one added later): ~300 of a new conversation's ~800 bytes. The ids,
# status and mode are always there (what a person or a script reading the hash looks for first).
_ALWAYS = ("tenant_id", "conversation_id", "status", "mode")
_OMITTED_AT_DEFAULT = tuple((name, default) for name, default in _DEFAULTS if name not in _ALWAYS)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _document(state: ConversationState | Fold) -> dict[str, Any]:
    data: dict[str, Any] = {name: getattr(state, name) for name in _ALWAYS}
    for name, default in _OMITTED_AT_DEFAULT:
        value = getattr(state, name)
        if value != default:
            data[name] = value
    if "metadata" in data:
        data["metadata"] = dict(state.metadata)
    if "recent_decisions" in data:
        data["recent_decisions"] = list(state.recent_decisions)
    if "recent_message_digests" in data:
        data["recent_message_digests"] = _b64(state.recent_message_digests)
    return data


def fold_event(state: ConversationState | None, event: Event, position: LogPosition) -> FoldResult:
    """Apply one event to a conversation's state; applying the same event again changes nothing."""
    fold = Fold(state) if state is not None else Fold.new(event.tenant_id, event.conversation_id)
    applied, sequence = fold.apply(event, position)
    return FoldResult(fold.freeze(), applied=applied, message_sequence=sequence)
