"""Reads: GetConversation from the Redis hot view, StreamConversation from its live stream.

Nothing here writes; the live-stream limit is the one piece of state (a slot is taken in the
same step as the check, so concurrent calls cannot all pass it)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import Event, EventDecodeError, event_type
from services.ingress import _validation as v
from services.ingress._hotview import (
    LIVE_BLOCK_MS,
    LIVE_SOCKET_TIMEOUT_S,
    IngressHotView,
    Registration,
    unknown_while_rebuilding,
)
from services.ingress._live import LiveHub
from services.settings import Settings
from streams.sessions import STATUS_CLOSED, ConversationState

log = logging.getLogger(__name__)

MAX_RECENT = 200
# Both parts of a Redis stream id are unsigned 64-bit: a larger one is refused by Redis itself.
_MAX_STREAM_ID_PART = 2**64 - 1
_TAG = re.compile(r"[0-9a-f]{10}")  # conversation_tag's form


class LiveFollow:
    """The updates of one StreamConversation call; holds a live-stream slot until closed."""

    def __init__(self, updates: AsyncIterator[chat_pb2.ConversationUpdate], release: object) -> None:
        self._updates = updates
        self._release = release

    def __aiter__(self) -> LiveFollow:
        return self

    async def __anext__(self) -> chat_pb2.ConversationUpdate:
        return await self._updates.__anext__()

    async def aclose(self) -> None:
        try:
            await self._updates.aclose()  # type: ignore[attr-defined]
        finally:
            release, self._release = self._release, None
            if callable(release):
                release()


class ConversationReads:
    def __init__(self, settings: Settings, hot: IngressHotView, live: aioredis.Redis | None = None) -> None:
        self._settings = settings
        self._hot = hot
        # With a Redis for live reads, calls follow live and reply-delta streams together through
        # the hub (a few blocking connections for all of them); without it (unit tests) each call
        # reads only events, on its own.
        self._live = live
        self._hub = (
            LiveHub(
                settings.redis_url,
                live,
                per_reader=settings.live_streams_per_reader,
                block_ms=LIVE_BLOCK_MS,
                socket_timeout_s=LIVE_SOCKET_TIMEOUT_S,
            )
            if live is not None
            else None
        )
        self._live_streams = 0

    def end_follows(self) -> None:
        """The process is draining: every StreamConversation call ends with UNAVAILABLE at once
        (its client resumes from its last cursor on another process) instead of holding the drain
        until its grace runs out. (Without a hub, in unit tests only, follows poll and are not ended.)"""
        if self._hub is not None:
            self._hub.end_follows(
                lambda: v.RequestRejected(
                    grpc.StatusCode.UNAVAILABLE,
                    "this ingress process is stopping; follow again from your last cursor "
                    "(another process serves it)",
                )
            )

    async def close(self) -> None:
        if self._hub is not None:
            await self._hub.close()

    async def require(self, tenant_id: str, conversation_id: str) -> Registration:
        reg = await self._hot.lookup(tenant_id, conversation_id)
        if reg is None:
            if not await self._hot.is_ready(self._settings.topic_partitions):
                raise unknown_while_rebuilding(tenant_id, conversation_id)
            raise v.RequestRejected(
                grpc.StatusCode.NOT_FOUND,
                f"conversation {conversation_id!r} of tenant {tenant_id!r} does not exist",
            )
        return reg

    async def read(self, tenant_id: str, conversation_id: str) -> chat_pb2.Conversation:
        return await self.get_conversation(
            chat_pb2.GetConversationRequest(tenant_id=tenant_id, conversation_id=conversation_id)
        )

    async def get_conversation(self, req: chat_pb2.GetConversationRequest) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        if req.recent_messages > MAX_RECENT:
            raise v.invalid(f"recent_messages is {req.recent_messages}; at most {MAX_RECENT}")
        reg = await self.require(req.tenant_id, req.conversation_id)
        state = ConversationState.from_json(json.loads(reg.state_json)) if reg.state_json else None
        conv = chat_pb2.Conversation(
            conversation_id=req.conversation_id,
            tenant_id=req.tenant_id,
            status=_status_of(reg, state),  # type: ignore[arg-type]
            created_at=_timestamp(reg.created_ns or (state.created_at_ns if state else 0)),
            channel=reg.channel or (state.channel if state else 0),  # type: ignore[arg-type]
            customer_id=reg.customer_id or (state.customer_id if state else ""),
            mode=chat_pb2.CONVERSATION_MODE_BOT,
            cursor=public_cursor(reg.cursor, conversation_tag(req.tenant_id, req.conversation_id)),
        )
        if reg.closed_ns:
            conv.closed_at.CopyFrom(_timestamp(reg.closed_ns))
        if state is not None:
            conv.mode = (
                chat_pb2.CONVERSATION_MODE_AGENT if state.mode == "agent" else chat_pb2.CONVERSATION_MODE_BOT
            )
            conv.message_count = state.message_count
            conv.updated_at.CopyFrom(_timestamp(state.updated_at_ns))
            conv.resolution = state.resolution
            conv.assignee = state.assignee
            conv.metadata.update(state.metadata)
            if state.closed_at_ns and not reg.closed_ns:
                conv.closed_at.CopyFrom(_timestamp(state.closed_at_ns))
        wanted = req.recent_messages or 20
        # Only the entries the state read above has folded, up to its cursor: the worker writes a
        # batch's live entries before the states (streams/sessions/_worker.py, APPLY_SCRIPT), and this is
        # a second round trip, so later entries may be there already. Without the bound, a view's
        # last message could be one its count does not include yet, and following on from its
        # cursor would deliver that message twice.
        until = reg.cursor or ("+" if state is not None else "")
        entries = (
            await self._hot.recent_entries(req.tenant_id, req.conversation_id, wanted * 3, until)
            if until
            else []
        )
        suffix = hv.live_event_suffix(req.tenant_id, req.conversation_id)
        tag = conversation_tag(req.tenant_id, req.conversation_id)
        messages = [
            m for m in (_message_of(eid, fields, suffix, tag) for eid, fields in entries) if m is not None
        ]
        conv.messages.extend(messages[-wanted:])
        return conv

    async def stream_conversation(self, req: chat_pb2.StreamConversationRequest) -> LiveFollow:
        """Checks the request and takes a live-stream slot; the caller must `aclose()` the result."""
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        tag = conversation_tag(req.tenant_id, req.conversation_id)
        after = stream_position(req.after_cursor, tag) if req.after_cursor else ""
        # Checked and counted in one step (no await in between).
        if self._live_streams >= self._settings.max_live_streams:
            raise v.RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this ingress follows {self._live_streams} conversations already "
                "(SWITCHBOARD_MAX_LIVE_STREAMS); retry later or on another replica",
            )
        self._live_streams += 1
        follow = LiveFollow(
            self._follow(req.tenant_id, req.conversation_id, after or "0-0", tag),
            self._free_slot,
        )
        try:
            reg = await self.require(req.tenant_id, req.conversation_id)
            if after:
                await self._check_cursor_retained(req.tenant_id, req.conversation_id, after, reg.cursor)
        except BaseException:
            await follow.aclose()
            raise
        return follow

    def _free_slot(self) -> None:
        self._live_streams -= 1

    async def _check_cursor_retained(
        self, tenant_id: str, conversation_id: str, cursor: str, state_cursor: str
    ) -> None:
        """A cursor older than what the live stream still holds would silently skip the trimmed
        entries, and one past its last entry (never handed out for this conversation: another
        conversation's, or made up) would wait for ever without delivering anything: refuse both
        so the client re-syncs (GetConversation, then follow from its cursor)."""
        first, last = await self._hot.live_window(tenant_id, conversation_id)
        if first is not None and _cursor_key(cursor) < _cursor_key(first):
            raise v.RequestRejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"cursor {cursor} is older than the live window (it starts at {first}; older entries "
                "were trimmed); call GetConversation and follow from its cursor",
            )
        # The state's cursor (what GetConversation hands out) can be past the stream's last entry:
        # the fold advances it over events it does not apply (a duplicate, a message that raced a
        # close), which get no entry. Either may be the newest cursor handed out.
        newest = max(
            (_cursor_key(c) for c in (last, state_cursor) if c and hv.is_valid_cursor(c)), default=None
        )
        if newest is not None and _cursor_key(cursor) > newest:
            raise v.RequestRejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"cursor {cursor} is past this conversation's last update: it is not a cursor "
                "of this conversation; call GetConversation and follow from its cursor",
            )

    async def _follow(
        self, tenant_id: str, conversation_id: str, after: str, tag: str
    ) -> AsyncIterator[chat_pb2.ConversationUpdate]:
        """Events after the live-stream entry `after`, and reply deltas from the moment the call
        began. A delta carries the cursor of the last event sent (the one the call started after,
        at first), so resuming from any update's cursor misses no event and repeats none; deltas
        themselves are never replayed."""
        suffix = hv.live_event_suffix(tenant_id, conversation_id)
        cursor = public_cursor("" if after == "0-0" else after, tag)
        if self._live is None:
            while True:
                entries = await self._hot.read_live(tenant_id, conversation_id, after, LIVE_BLOCK_MS)
                for entry_id, fields in entries:
                    after = entry_id.decode()
                    update = _update_of(after, fields, suffix, tag)
                    if update is not None:
                        yield update
        assert self._hub is not None
        live_key = hv.live_stream_key(tenant_id, conversation_id)
        delta_key = hv.reply_stream_key(tenant_id, conversation_id)
        delta_after = await self._last_delta_id(delta_key)
        subscription = self._hub.subscribe({live_key: after, delta_key: delta_after})
        try:
            while True:
                events: list[tuple[bytes, dict[bytes, bytes]]] = []
                deltas: list[tuple[bytes, dict[bytes, bytes]]] = []
                for name, entries in await subscription.next():
                    (events if name == live_key else deltas).extend(entries)
                # Deltas first: a reply's tokens are produced before its finished event is durable.
                for _, fields in deltas:
                    delta = _delta_of(fields)
                    if delta is not None:
                        yield chat_pb2.ConversationUpdate(cursor=cursor, reply_delta=delta)
                for entry_id, fields in events:
                    update = _update_of(entry_id.decode(), fields, suffix, tag)
                    if update is not None:
                        cursor = update.cursor
                        yield update
        finally:
            subscription.close()

    async def _last_delta_id(self, key: str) -> str:
        """Where deltas start for this call: after the newest one there is now (XREAD's "$",
        pinned once so that no delta between two reads is lost)."""
        assert self._live is not None
        newest: Any = await self._live.xrevrange(key, count=1)
        return newest[0][0].decode() if newest else "0-0"


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    if ns:
        ts.FromNanoseconds(ns)
    return ts


def _status_of(reg: Registration, state: ConversationState | None) -> int:
    closed = reg.closed_ns or (state is not None and state.status == STATUS_CLOSED)
    return chat_pb2.CONVERSATION_STATUS_CLOSED if closed else chat_pb2.CONVERSATION_STATUS_OPEN


def conversation_tag(tenant_id: str, conversation_id: str) -> str:
    """What a cursor carries of its conversation (see `public_cursor`)."""
    named = f"{len(tenant_id)}:{tenant_id}{conversation_id}".encode()
    return hashlib.blake2b(named, digest_size=5, person=b"sb-cursor").hexdigest()


def public_cursor(entry_id: str, tag: str) -> str:
    """The cursor a client gets for a live-stream entry: the entry id (the event's Kafka offset,
    so conversations of one partition share the number space) and its conversation's tag, so a
    cursor passed to another conversation is refused instead of read as a position in it."""
    return f"{entry_id}.{tag}" if entry_id else ""


def stream_position(cursor: str, tag: str) -> str:
    """The live-stream entry id of a client's cursor, or INVALID_ARGUMENT. A cursor without a tag
    (handed out before cursors carried one) is taken as it is."""
    entry_id, dot, given = cursor.partition(".")
    if not (
        hv.is_valid_cursor(entry_id)
        and max(_cursor_key(entry_id)) <= _MAX_STREAM_ID_PART
        and (not dot or _TAG.fullmatch(given))
    ):
        raise v.invalid(f"after_cursor {cursor[:40]!r} is not a cursor from a ConversationUpdate")
    if dot and given != tag:
        raise v.invalid(
            f"after_cursor {cursor[:40]!r} is a cursor of another conversation; pass one from this "
            "conversation's updates or GetConversation, or none to replay it from the start"
        )
    return entry_id


def _cursor_key(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


def _decode_entry(fields: dict[bytes, bytes], suffix: bytes) -> Event | None:
    """The entry's event, its tenant and conversation ids put back (`hv.live_event_suffix`)."""
    try:
        return hv.live_entry_event(fields, suffix)
    except EventDecodeError:
        log.warning("undecodable live-stream entry skipped")
        return None


def _update_of(
    entry_id: str, fields: dict[bytes, bytes], suffix: bytes, tag: str
) -> chat_pb2.ConversationUpdate | None:
    event = _decode_entry(fields, suffix)
    if event is None:
        return None
    closed = fields.get(hv.S_STATUS.encode()) == STATUS_CLOSED.encode()
    return chat_pb2.ConversationUpdate(
        cursor=public_cursor(entry_id, tag),
        event=event,
        status=chat_pb2.CONVERSATION_STATUS_CLOSED if closed else chat_pb2.CONVERSATION_STATUS_OPEN,
        message_count=int(fields.get(hv.S_MESSAGES.encode(), b"0")),
    )


def _delta_of(fields: dict[bytes, bytes]) -> chat_pb2.ReplyDelta | None:
    delta = chat_pb2.ReplyDelta()
    try:
        delta.ParseFromString(fields.get(hv.REPLY_DELTA_FIELD, b""))
    except DecodeError:
        log.warning("undecodable reply delta skipped")
        return None
    return delta if delta.reply_id else None


def _message_of(
    entry_id: bytes, fields: dict[bytes, bytes], suffix: bytes, tag: str
) -> chat_pb2.Message | None:
    sequence = int(fields.get(hv.S_SEQUENCE.encode(), b"0"))
    if not sequence:
        return None
    event = _decode_entry(fields, suffix)
    if event is None:
        return None
    kind = event_type(event)
    msg = chat_pb2.Message(
        event_id=event.event_id,
        occurred_at=event.occurred_at,
        sequence=sequence,
        cursor=public_cursor(entry_id.decode(), tag),
    )
    if kind == "message_received":
        msg.client_message_id = event.message_received.client_message_id
        msg.text = event.message_received.text
        msg.sender = event.message_received.sender
    elif kind == "agent_message_sent":
        msg.client_message_id = event.agent_message_sent.client_message_id
        msg.text = event.agent_message_sent.text
        msg.sender = events_pb2.SENDER_AGENT
    elif kind == "reply_generated":
        msg.text = event.reply_generated.text
        msg.sender = events_pb2.SENDER_BOT
    else:
        return None
    return msg
