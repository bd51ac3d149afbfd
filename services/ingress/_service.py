"""ChatService: validation, the idempotent write path, and reads from the hot view."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from switchboard.v1 import chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import Event, EventDecodeError, decode_event, event_type, new_event, new_event_id
from services.ingress import _validation as v
from services.ingress._hotview import CLAIM_TTL_S, Claim, IngressHotView, Registration
from services.ingress._producer import RETRY_AFTER_KEY, Ack, EventProducer, Unavailable, unavailable
from services.settings import Settings
from streams.sessions import STATUS_CLOSED, ConversationState

log = logging.getLogger(__name__)

_CHANNELS = frozenset(events_pb2.Channel.values())
# What starts and closes claim in the client_message_id space (no client id has a NUL in it).
_START_CLAIM = "\x00start"
_CLOSE_CLAIM = "\x00close"
MAX_RECENT = 200
STREAM_BLOCK_MS = 5_000


class WriteOrder:
    """Chains batches of one stream: each enqueues its records after the previous one has."""

    def __init__(self, previous: WriteOrder | None) -> None:
        self._previous = previous
        self._enqueued = asyncio.Event()
        # Conversations of this stream with a message that was not written: their later messages
        # are refused, so that resending the failed one cannot land after them.
        self.failed: set[tuple[str, str]] = previous.failed if previous is not None else set()

    async def wait_for_previous(self) -> None:
        if self._previous is not None:
            await self._previous._enqueued.wait()
            self._previous = None  # let the chain be collected

    def mark_enqueued(self) -> None:
        self._enqueued.set()


class MessageBatcher:
    """Coalesces concurrent unary SendMessage calls into one `accept_messages` batch per event-loop
    tick: the calls share Redis round trips and a produce burst, and nobody waits for a timer."""

    def __init__(self, service: ChatService, max_batch: int = 512) -> None:
        self._service = service
        self._max_batch = max_batch
        self._pending: list[
            tuple[
                chat_pb2.SendMessageRequest | MalformedRequest,
                str,
                asyncio.Future[chat_pb2.SendMessageResponse | v.RequestRejected],
            ]
        ] = []
        self._flush_scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def submit(
        self, request: chat_pb2.SendMessageRequest | MalformedRequest, traceparent: str
    ) -> chat_pb2.SendMessageResponse | v.RequestRejected:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[chat_pb2.SendMessageResponse | v.RequestRejected] = loop.create_future()
        self._pending.append((request, traceparent, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            task = asyncio.ensure_future(self._run(pending[start : start + self._max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(
        self,
        batch: list[
            tuple[
                chat_pb2.SendMessageRequest | MalformedRequest,
                str,
                asyncio.Future[chat_pb2.SendMessageResponse | v.RequestRejected],
            ]
        ],
    ) -> None:
        try:
            outcomes = await self._service.accept_messages([r for r, _, _ in batch], [t for _, t, _ in batch])
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


class MalformedRequest:
    """What the deserializer hands over when the bytes are not a valid request message."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def rejection(self) -> v.RequestRejected:
        return v.invalid(
            f"request is not a valid {self.type_name} (string fields must be valid UTF-8): {self.reason}"
        )


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    if ns:
        ts.FromNanoseconds(ns)
    return ts


def _traceparent(context: grpc.aio.ServicerContext | None) -> str:
    if context is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str):
            return value[:128]
    return ""


def _response(req: chat_pb2.SendMessageRequest, ack: Ack, duplicate: bool) -> chat_pb2.SendMessageResponse:
    return chat_pb2.SendMessageResponse(
        event_id=ack.event_id,
        partition=ack.partition,
        offset=ack.offset,
        duplicate=duplicate,
        client_message_id=req.client_message_id,
        conversation_id=req.conversation_id,
    )


def _status_of(reg: Registration, state: ConversationState | None) -> int:
    closed = reg.closed_ns or (state is not None and state.status == STATUS_CLOSED)
    return chat_pb2.CONVERSATION_STATUS_CLOSED if closed else chat_pb2.CONVERSATION_STATUS_OPEN


class ChatService:
    def __init__(self, settings: Settings, producer: EventProducer, hot: IngressHotView) -> None:
        self._settings = settings
        self._producer = producer
        self._hot = hot
        self._live_streams = 0
        self._tasks: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ writes

    async def accept_messages(
        self,
        requests: Sequence[chat_pb2.SendMessageRequest | MalformedRequest],
        traceparents: Sequence[str] | str = "",
        order: WriteOrder | None = None,
    ) -> list[chat_pb2.SendMessageResponse | v.RequestRejected]:
        """Validate, deduplicate and write a batch of messages; one outcome per request, in order.

        With `order`, this batch's records enter Kafka only after the previous batch's did, so
        batches processed concurrently still keep the caller's order within each conversation."""
        results: list[chat_pb2.SendMessageResponse | v.RequestRejected | None] = [None] * len(requests)
        if isinstance(traceparents, str):
            traceparents = [traceparents] * len(requests)
        valid: list[tuple[int, chat_pb2.SendMessageRequest]] = []
        for i, req in enumerate(requests):
            if isinstance(req, MalformedRequest):
                results[i] = req.rejection()
                continue
            try:
                v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
                v.check_conversation_id(req.conversation_id)
                v.check_client_message_id(req.client_message_id)
                v.check_text(req.text, self._settings.max_message_bytes)
            except v.RequestRejected as exc:
                results[i] = exc
                continue
            valid.append((i, req))

        try:
            if valid:
                await self._write_messages(valid, results, traceparents, order)
        finally:
            if order is not None:
                order.mark_enqueued()
        return [
            r if r is not None else v.RequestRejected(grpc.StatusCode.INTERNAL, "no outcome") for r in results
        ]

    async def _write_messages(
        self,
        valid: list[tuple[int, chat_pb2.SendMessageRequest]],
        results: list[chat_pb2.SendMessageResponse | v.RequestRejected | None],
        traceparents: Sequence[str],
        order: WriteOrder | None,
    ) -> None:
        conversations = sorted({(req.tenant_id, req.conversation_id) for _, req in valid})
        registrations = dict(zip(conversations, await self._hot.lookup_many(conversations), strict=True))

        # The first request for a key writes; repeats of that key in the same batch follow it.
        first_of: dict[tuple[str, str, str], int] = {}
        followers: list[tuple[int, int]] = []
        writers: list[tuple[int, chat_pb2.SendMessageRequest]] = []
        for i, req in valid:
            reg = registrations[(req.tenant_id, req.conversation_id)]
            if reg is None:
                results[i] = v.RequestRejected(
                    grpc.StatusCode.NOT_FOUND,
                    f"conversation {req.conversation_id!r} of tenant {req.tenant_id!r} does not exist "
                    "(start it with StartConversation)",
                )
                continue
            if reg.closed_ns:
                results[i] = v.RequestRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"conversation {req.conversation_id!r} is closed; start a new conversation",
                )
                continue
            key = (req.tenant_id, req.conversation_id, req.client_message_id)
            if key in first_of:
                followers.append((i, first_of[key]))
                continue
            first_of[key] = i
            writers.append((i, req))
        if not writers:
            return

        granted = self._producer.reserve_up_to(len(writers))
        if granted < len(writers):
            for i, _ in writers[granted:]:
                results[i] = self._producer.exhausted()
            writers = writers[:granted]
            if not writers:
                self._resolve_followers(followers, results)
                return
        claimed: list[tuple[str, str, str]] = []
        settled: list[tuple[tuple[str, str, str], Ack | None]] = []
        try:
            keys = [(r.tenant_id, r.conversation_id, r.client_message_id) for _, r in writers]
            claims = await self._hot.claim_many(keys)
            claimed = [key for key, claim in zip(keys, claims, strict=True) if claim.claimed]
            to_send: list[tuple[int, chat_pb2.SendMessageRequest, tuple[str, str, str]]] = []
            for (i, req), key, claim in zip(writers, keys, claims, strict=True):
                outcome = self._outcome_of_claim(req, claim)
                if outcome is None:
                    to_send.append((i, req, key))
                else:
                    results[i] = outcome
            if order is not None:
                await order.wait_for_previous()
            enqueued: list[tuple[Event | None, asyncio.Future[object] | v.RequestRejected]] = []
            for i, req, _ in to_send:
                conversation = (req.tenant_id, req.conversation_id)
                if order is not None and conversation in order.failed:
                    enqueued.append((None, _after_failure(req)))
                    continue
                event, delivery = await self._enqueue_message(req, traceparents[i])
                if order is not None and isinstance(delivery, Unavailable):
                    order.failed.add(conversation)
                enqueued.append((event, delivery))
            if order is not None:
                order.mark_enqueued()
            sent = await self._await_deliveries(enqueued, [key for _, _, key in to_send])
            for (i, req, key), written in zip(to_send, sent, strict=True):
                if isinstance(written, Ack):
                    results[i] = _response(req, written, duplicate=False)
                    settled.append((key, written))
                    continue
                results[i] = written
                if order is not None:
                    order.failed.add((req.tenant_id, req.conversation_id))
                if not (isinstance(written, Unavailable) and written.late_possible):
                    settled.append((key, None))
            await self._settle(settled)
        except BaseException:
            # Failed half-way (Redis gone, cancelled): free the claims no outcome was recorded
            # for, so a retry is not told "in flight" until the claim expires.
            done = {key for key, _ in settled}
            leftover = [(key, None) for key in claimed if key not in done]
            if leftover:
                with contextlib.suppress(Exception):
                    await self._hot.settle_many(leftover)
            raise
        finally:
            self._producer.release(granted)
        self._resolve_followers(followers, results)

    @staticmethod
    def _outcome_of_claim(
        req: chat_pb2.SendMessageRequest, claim: Claim
    ) -> chat_pb2.SendMessageResponse | v.RequestRejected | None:
        if claim.claimed:
            return None
        if claim.earlier is not None:
            return _response(req, claim.earlier, duplicate=True)
        return unavailable(
            f"client_message_id {req.client_message_id!r} is being written by an earlier attempt; "
            "retry shortly to get its ack"
        )

    @staticmethod
    def _resolve_followers(
        followers: list[tuple[int, int]],
        results: list[chat_pb2.SendMessageResponse | v.RequestRejected | None],
    ) -> None:
        for i, first in followers:
            outcome = results[first]
            if isinstance(outcome, chat_pb2.SendMessageResponse):
                follower = chat_pb2.SendMessageResponse()
                follower.CopyFrom(outcome)
                follower.duplicate = True
                results[i] = follower
            else:
                results[i] = outcome

    async def _enqueue_message(
        self, req: chat_pb2.SendMessageRequest, traceparent: str
    ) -> tuple[Event, asyncio.Future[object] | Unavailable]:
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            message_received=events_pb2.MessageReceived(
                client_message_id=req.client_message_id, text=req.text, sender=events_pb2.SENDER_CUSTOMER
            ),
        )
        try:
            return event, await self._producer.enqueue(event)
        except Unavailable as exc:
            return event, exc

    async def _await_deliveries(
        self,
        enqueued: list[tuple[Event | None, asyncio.Future[object] | v.RequestRejected]],
        keys: list[tuple[str, str, str]],
    ) -> list[Ack | v.RequestRejected]:
        """Acks for a batch's enqueued records, in order; refusals pass through."""
        waiting = [
            (i, event, delivery)
            for i, (event, delivery) in enumerate(enqueued)
            if event is not None and not isinstance(delivery, v.RequestRejected)
        ]
        acks = await self._producer.wait_acks(
            [event for _, event, _ in waiting if event is not None],
            [delivery for _, _, delivery in waiting if not isinstance(delivery, v.RequestRejected)],
            [self._late_settler(keys[i]) for i, _, _ in waiting],
        )
        outcomes: list[Ack | v.RequestRejected] = [
            delivery if isinstance(delivery, v.RequestRejected) else v.invalid("not sent")
            for _, delivery in enqueued
        ]
        for (i, _, delivery), ack in zip(waiting, acks, strict=True):
            outcomes[i] = ack
            if (
                isinstance(ack, Unavailable)
                and ack.late_possible
                and not isinstance(delivery, v.RequestRejected)
            ):
                self._background(self._keep_claim(keys[i], delivery))
        return outcomes

    def _late_settler(self, key: tuple[str, str, str]) -> Callable[[Ack | None], Awaitable[None]]:
        """Records the outcome of a write whose caller was already told UNAVAILABLE: a retry
        then gets the first ack (duplicate=true) instead of writing the message again."""

        async def settle(ack: Ack | None) -> None:
            await self._settle([(key, ack)])

        return settle

    async def _keep_claim(self, key: tuple[str, str, str], delivery: asyncio.Future[object]) -> None:
        # The producer retries a sent record until Kafka takes it, however long Kafka is away;
        # the claim must outlive that, or a retry would write the message a second time.
        while not delivery.done():
            await asyncio.wait({delivery}, timeout=CLAIM_TTL_S / 3)
            if not delivery.done():
                with contextlib.suppress(Exception):
                    await self._hot.touch_claims([key])

    async def _settle(self, outcomes: list[tuple[tuple[str, str, str], Ack | None]]) -> None:
        """Record outcomes of claims; Redis being away must not turn a durable write into an
        error for its caller, so this retries in the background until Redis takes it."""
        try:
            await self._hot.settle_many(outcomes)
        except Exception as exc:
            log.warning(
                "recording %d write outcomes failed (%r); retrying in the background", len(outcomes), exc
            )
            self._background(self._settle_later(outcomes))

    async def _settle_later(self, outcomes: list[tuple[tuple[str, str, str], Ack | None]]) -> None:
        for attempt in range(60):
            await asyncio.sleep(min(0.5 * 2**attempt, 10.0))
            try:
                await self._hot.settle_many(outcomes)
                return
            except Exception:
                continue
        log.error("gave up recording %d write outcomes; their claims expire on their own", len(outcomes))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start_conversation(
        self, req: chat_pb2.StartConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        s = self._settings
        v.check_tenant(req.tenant_id, s.allowed_tenants)
        v.check_conversation_id(req.conversation_id, required=False)
        if req.channel not in _CHANNELS:
            raise v.invalid(f"channel {req.channel} is not a switchboard.v1.Channel value")
        v.check_short_text(req.customer_id, "customer_id", v.MAX_CUSTOMER_ID)
        v.check_short_text(req.locale, "locale", 35)
        v.check_metadata(dict(req.metadata), s.max_metadata_entries)

        conversation_id = req.conversation_id or new_event_id()
        claim_key = (req.tenant_id, conversation_id, _START_CLAIM)
        if req.conversation_id:
            existing = await self._hot.lookup(req.tenant_id, conversation_id)
            if existing is not None:
                return await self.get_conversation(
                    chat_pb2.GetConversationRequest(tenant_id=req.tenant_id, conversation_id=conversation_id)
                )
            (claim,) = await self._hot.claim_many([claim_key])
            if not claim.claimed:
                raise unavailable(f"conversation {conversation_id!r} is being started by an earlier attempt")

        event = new_event(
            req.tenant_id,
            conversation_id,
            traceparent=traceparent,
            conversation_started=events_pb2.ConversationStarted(
                channel=req.channel,
                customer_id=req.customer_id,
                metadata=dict(req.metadata),
                locale=req.locale,
            ),
        )
        ack = await self._publish_one(event, claim_key if req.conversation_id else None)
        created_ns = event.occurred_at.ToNanoseconds()
        try:
            await self._hot.register(
                req.tenant_id,
                conversation_id,
                created_ns=created_ns,
                channel=req.channel,
                customer_id=req.customer_id,
            )
        except Exception as exc:
            # The start is durable; the sessions worker registers it too when it folds the event.
            log.warning("registering conversation %s failed (%r); the worker will", conversation_id, exc)
        if req.conversation_id:
            await self._settle([(claim_key, ack)])
        return chat_pb2.Conversation(
            conversation_id=conversation_id,
            tenant_id=req.tenant_id,
            status=chat_pb2.CONVERSATION_STATUS_OPEN,
            created_at=event.occurred_at,
            updated_at=event.occurred_at,
            channel=req.channel,
            customer_id=req.customer_id,
            mode=chat_pb2.CONVERSATION_MODE_BOT,
            metadata=dict(req.metadata),
        )

    async def close_conversation(
        self, req: chat_pb2.CloseConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_short_text(req.resolution, "resolution", v.MAX_RESOLUTION)
        reg = await self._require(req.tenant_id, req.conversation_id)
        claim_key = (req.tenant_id, req.conversation_id, _CLOSE_CLAIM)
        if not reg.closed_ns and (await self._hot.claim_many([claim_key]))[0].claimed:
            event = new_event(
                req.tenant_id,
                req.conversation_id,
                traceparent=traceparent,
                conversation_closed=events_pb2.ConversationClosed(
                    resolution=req.resolution, closed_by=events_pb2.SENDER_CUSTOMER
                ),
            )
            # Closed for senders before the close is written, so no message is accepted after it.
            await self._hot.mark_closed(req.tenant_id, req.conversation_id, event.occurred_at.ToNanoseconds())
            try:
                ack = await self._publish_one(event, claim_key)
            except v.RequestRejected as exc:
                if not (isinstance(exc, Unavailable) and exc.late_possible):
                    await self._hot.clear_closed(req.tenant_id, req.conversation_id)
                raise
            await self._settle([(claim_key, ack)])
        # Closing a closed conversation is a no-op, so a retried close is safe.
        return await self.get_conversation(
            chat_pb2.GetConversationRequest(tenant_id=req.tenant_id, conversation_id=req.conversation_id)
        )

    async def _publish_one(self, event: Event, claim_key: tuple[str, str, str] | None) -> Ack:
        self._producer.reserve()
        try:
            delivery = await self._producer.enqueue(event)
            late = self._late_settler(claim_key) if claim_key is not None else None
            (outcome,) = await self._producer.wait_acks([event], [delivery], [late])
            if isinstance(outcome, Ack):
                return outcome
            if claim_key is not None and outcome.late_possible:
                self._background(self._keep_claim(claim_key, delivery))
                claim_key = None  # settled by the late ack
            raise outcome
        except Unavailable:
            if claim_key is not None:
                await self._settle([(claim_key, None)])
            raise
        finally:
            self._producer.release()

    # ------------------------------------------------------------------ reads

    async def _require(self, tenant_id: str, conversation_id: str) -> Registration:
        reg = await self._hot.lookup(tenant_id, conversation_id)
        if reg is None:
            raise v.RequestRejected(
                grpc.StatusCode.NOT_FOUND,
                f"conversation {conversation_id!r} of tenant {tenant_id!r} does not exist",
            )
        return reg

    async def get_conversation(self, req: chat_pb2.GetConversationRequest) -> chat_pb2.Conversation:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        if req.recent_messages > MAX_RECENT:
            raise v.invalid(f"recent_messages is {req.recent_messages}; at most {MAX_RECENT}")
        reg = await self._require(req.tenant_id, req.conversation_id)
        state = ConversationState.from_json(json.loads(reg.state_json)) if reg.state_json else None
        conv = chat_pb2.Conversation(
            conversation_id=req.conversation_id,
            tenant_id=req.tenant_id,
            status=_status_of(reg, state),  # type: ignore[arg-type]
            created_at=_timestamp(reg.created_ns or (state.created_at_ns if state else 0)),
            channel=reg.channel or (state.channel if state else 0),  # type: ignore[arg-type]
            customer_id=reg.customer_id or (state.customer_id if state else ""),
            mode=chat_pb2.CONVERSATION_MODE_BOT,
            cursor=reg.cursor,
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
        entries = await self._hot.recent_entries(req.tenant_id, req.conversation_id, wanted * 3)
        messages = [m for m in (_message_of(eid, fields) for eid, fields in entries) if m is not None]
        conv.messages.extend(messages[-wanted:])
        return conv

    async def stream_conversation(
        self, req: chat_pb2.StreamConversationRequest
    ) -> AsyncIterator[chat_pb2.ConversationUpdate]:
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        if req.after_cursor and not hv.is_valid_cursor(req.after_cursor):
            raise v.invalid(
                f"after_cursor {req.after_cursor[:40]!r} is not a cursor from a ConversationUpdate"
            )
        if self._live_streams >= self._settings.max_live_streams:
            raise v.RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this ingress follows {self._live_streams} conversations already "
                "(SWITCHBOARD_MAX_LIVE_STREAMS); retry later or on another replica",
            )
        await self._require(req.tenant_id, req.conversation_id)
        after = req.after_cursor or "0-0"
        if req.after_cursor:
            await self._check_cursor_retained(req.tenant_id, req.conversation_id, req.after_cursor)
        return self._follow(req.tenant_id, req.conversation_id, after)

    async def _check_cursor_retained(self, tenant_id: str, conversation_id: str, cursor: str) -> None:
        """A cursor older than what the live stream still holds would silently skip the trimmed
        entries: refuse it so the client re-syncs (GetConversation, then follow from its cursor)."""
        first = await self._hot.first_retained(tenant_id, conversation_id)
        if first is not None and _cursor_key(cursor) < _cursor_key(first):
            raise v.RequestRejected(
                grpc.StatusCode.OUT_OF_RANGE,
                f"cursor {cursor} is older than the live window (it starts at {first}; older entries "
                "were trimmed); call GetConversation and follow from its cursor",
            )

    async def _follow(
        self, tenant_id: str, conversation_id: str, after: str
    ) -> AsyncIterator[chat_pb2.ConversationUpdate]:
        self._live_streams += 1
        try:
            while True:
                entries = await self._hot.read_live(tenant_id, conversation_id, after, STREAM_BLOCK_MS)
                for entry_id, fields in entries:
                    after = entry_id.decode()
                    update = _update_of(after, fields)
                    if update is not None:
                        yield update
        finally:
            self._live_streams -= 1


def _after_failure(req: chat_pb2.SendMessageRequest) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.ABORTED,
        f"not written: an earlier message of conversation {req.conversation_id!r} in this stream "
        "failed; resend from that one to keep the order",
    )


def _cursor_key(cursor: str) -> tuple[int, int]:
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


def _decode_entry(fields: dict[bytes, bytes]) -> Event | None:
    try:
        return decode_event(fields.get(hv.S_EVENT.encode()))
    except EventDecodeError:
        log.warning("undecodable live-stream entry skipped")
        return None


def _update_of(cursor: str, fields: dict[bytes, bytes]) -> chat_pb2.ConversationUpdate | None:
    event = _decode_entry(fields)
    if event is None:
        return None
    closed = fields.get(hv.S_STATUS.encode()) == STATUS_CLOSED.encode()
    return chat_pb2.ConversationUpdate(
        cursor=cursor,
        event=event,
        status=chat_pb2.CONVERSATION_STATUS_CLOSED if closed else chat_pb2.CONVERSATION_STATUS_OPEN,
        message_count=int(fields.get(hv.S_MESSAGES.encode(), b"0")),
    )


def _message_of(entry_id: bytes, fields: dict[bytes, bytes]) -> chat_pb2.Message | None:
    sequence = int(fields.get(hv.S_SEQUENCE.encode(), b"0"))
    if not sequence:
        return None
    event = _decode_entry(fields)
    if event is None:
        return None
    kind = event_type(event)
    msg = chat_pb2.Message(
        event_id=event.event_id, occurred_at=event.occurred_at, sequence=sequence, cursor=entry_id.decode()
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


def retry_metadata(exc: v.RequestRejected) -> tuple[tuple[str, str], ...]:
    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ((RETRY_AFTER_KEY, "500"),)
    return ()
