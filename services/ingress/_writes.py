"""The write path: what reaches Kafka, once, and in which order. Each guarantee has one home here.

- Claim (`_Settlement`): a client_message_id is claimed in Redis before its record is produced,
  and the claim is settled only once Kafka's outcome is known: the ack is recorded (a retry gets
  it, duplicate=true) or, when Kafka refused the record, the claim is dropped. Writes run in tasks
  of their own, so a caller that is cancelled or runs out of deadline never drops a claim whose
  record may still land.
- Order (`WriteOrder`): batches of one SendMessages stream take turns; a batch enqueues only after
  the previous one did, and ends its turn only after that, whether it wrote anything or not.
- Failure stops the conversation (`WriteOrder.failed`): after any failure of a message (refused,
  in flight elsewhere, over the in-flight bound, Kafka away, an exception) the stream's later
  messages of that conversation are ABORTED, so a resend can never land behind them. That is
  checked against each conversation's last record handed over (`WriteOrder.stopped`), not only
  against batch outcomes (known once all of a batch's acks are in): a later message is ABORTED
  as soon as that record failed, or while it is unacknowledged on a producer since replaced
  (records of one producer land in enqueue order; of two producers, in no order).
- Close after durable (`ConversationGate`): sends and closes of one conversation take turns in
  this process. A close refuses new sends, waits for sends being handed to the producer, and
  the hot view says closed only once the close event is durable.
- Close after every acknowledged message, across processes (`_wait_in_flight`): a claimed
  message sits in its conversation's in-flight set in Redis until settled; a close first holds
  the conversation (the claim script then refuses its sends in every ingress process), waits
  until no other process has one unsettled, and only then publishes (this process's own are
  ordered by the gate). A message racing a close is either before the close in the log or
  refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from switchboard.v1 import agent_pb2, chat_pb2, events_pb2

from schemas import hotview as hv
from schemas.events import Event, new_event, new_event_id
from services.ingress import _validation as v
from services.ingress._errors import as_rejection
from services.ingress._hotview import (
    CLAIM_TTL_S,
    Claim,
    HeldClaim,
    IngressHotView,
    Registration,
    rebuilding,
    unknown_while_rebuilding,
)
from services.ingress._producer import Ack, EventProducer, Unavailable, unavailable
from services.ingress._quotas import Quotas, too_many_open
from services.settings import Settings
from streams.privacy.erasures import ErasureChange, ErasureFollower, Erasures, ErasuresUnavailable
from streams.sessions import STATUS_CLOSED, ConversationState

log = logging.getLogger(__name__)

ClaimKey = tuple[str, str, str]  # tenant, conversation, client_message_id
Conversation = tuple[str, str]  # tenant, conversation
Outcome = chat_pb2.SendMessageResponse | v.RequestRejected
_CHANNELS = frozenset(events_pb2.Channel.values())
# Conversations the registry remembers per process (about 200 bytes each).
REGISTRY_MAX = 200_000
# How long a message whose claim is pending in another attempt waits for that attempt's outcome
# before it is refused UNAVAILABLE ("being written by an earlier attempt"): a retry right after
# an ack, in another process, usually finds the ack recorded within milliseconds. Looked at again
# after IN_FLIGHT_RECHECK_S, then twice as long each time. Only such a message's batch waits.
IN_FLIGHT_WAIT_S = 0.25
IN_FLIGHT_RECHECK_S = 0.005
# How long the acks of answered messages may wait to be recorded in Redis with the next round trip
# (a claim, say) instead of one of their own: one round trip less per message when calls come one
# at a time. A retry meanwhile is answered from _unsettled here, or finds the claim pending in
# another process and looks again after IN_FLIGHT_RECHECK_S.
SETTLE_ACKED_WITHIN_S = 0.004
# How long a message whose claim is pending in a dead process's attempt waits for the sessions
# worker to fold its partition to the log's end before it takes the claim over (see _take_over).
TAKEOVER_WAIT_S = 3.0
# The resolution of a close finished for an ingress process that died while making it.
DEAD_CLOSE_RESOLUTION = "closed on behalf of an ingress process that died while closing it"
TAKEOVER_POLL_S = 0.05
# A state document's status field says "closed" (the key `closed_at_ns` does not match this).
_CLOSED_STATUS = f'"{STATUS_CLOSED}"'.encode()
R = TypeVar("R")


class WriteOrder:
    """One batch's turn in a SendMessages stream: it enqueues after the previous batch did.

    Every batch calls `wait_turn` and then `end_turn` exactly once, also when it fails or has
    nothing to write, so a later batch can never enqueue before an earlier one."""

    def __init__(self, previous: WriteOrder | None) -> None:
        self._previous = previous
        self._ended = asyncio.Event()
        # Conversations of this stream with a message that was not written: their later messages
        # are refused, so that resending the failed one cannot land after them.
        self.failed: set[Conversation] = previous.failed if previous is not None else set()
        # Per conversation, its last record handed to the producer and that producer's generation;
        # an entry goes once its batch has the outcome (a failure is in `failed` then).
        self.last: dict[Conversation, tuple[asyncio.Future[object], int]] = (
            previous.last if previous is not None else {}
        )

    def stopped(self, conversation: Conversation, generation: int) -> bool:
        """Whether a record of `conversation` enqueued now (to producer `generation`) could land
        ahead of the stream's earlier one: that one failed already (its batch has not said so
        yet), or it is still unacknowledged on a replaced producer. Marks it failed if so."""
        last = self.last.get(conversation)
        if last is None:
            return False
        delivery, written_by = last
        if delivery.done():
            if not delivery.cancelled() and delivery.exception() is None:
                return False
        elif written_by == generation:
            return False  # one idempotent producer writes a partition's records in enqueue order
        self.failed.add(conversation)
        return True

    def handed(self, conversation: Conversation, delivery: asyncio.Future[object], generation: int) -> None:
        self.last[conversation] = (delivery, generation)

    def answered(self, conversation: Conversation, delivery: asyncio.Future[object]) -> None:
        """The batch that handed `delivery` over has its outcome (a failure is in `failed`)."""
        last = self.last.get(conversation)
        if last is not None and last[0] is delivery:
            del self.last[conversation]

    async def wait_turn(self) -> None:
        if self._previous is not None:
            await self._previous._ended.wait()
            self._previous = None  # let the chain be collected

    def end_turn(self) -> None:
        self._ended.set()


class ConversationGate:
    """Sends and closes of one conversation take turns in this ingress process."""

    def __init__(self) -> None:
        self._sending: dict[Conversation, int] = {}
        self._idle: dict[Conversation, asyncio.Event] = {}
        self._closing: set[Conversation] = set()

    def begin_send(self, conversation: Conversation) -> bool:
        """False while the conversation is being closed; pair a True with `end_send`."""
        if conversation in self._closing:
            return False
        self._sending[conversation] = self._sending.get(conversation, 0) + 1
        return True

    def end_send(self, conversation: Conversation) -> None:
        left = self._sending[conversation] - 1
        if left:
            self._sending[conversation] = left
            return
        del self._sending[conversation]
        idle = self._idle.pop(conversation, None)
        if idle is not None:
            idle.set()

    async def close(self, conversation: Conversation) -> bool:
        """Refuse new sends and wait for the ones being enqueued; False if another close of the
        conversation holds the gate. Pair a True with `reopen` once the close's outcome is known."""
        if conversation in self._closing:
            return False
        self._closing.add(conversation)
        try:
            while conversation in self._sending:
                await self._idle.setdefault(conversation, asyncio.Event()).wait()
        except BaseException:
            self._closing.discard(conversation)
            raise
        return True

    def reopen(self, conversation: Conversation) -> None:
        self._closing.discard(conversation)


@dataclass(eq=False)
class _Write:
    """A record handed to the producer, and what to do once Kafka answered."""

    event: Event
    delivery: asyncio.Future[object]
    claim: HeldClaim | None
    after: Callable[[Ack | None], Awaitable[None]] | None = None
    # Set once Kafka answered and the claim is settled: the Ack or why there is none.
    outcome: asyncio.Future[Ack | Unavailable] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ConversationWrites:
    """StartConversation, SendMessage(s) and CloseConversation: validate, claim, produce, settle."""

    def __init__(
        self,
        settings: Settings,
        producer: EventProducer,
        hot: IngressHotView,
        read_conversation: Callable[[str, str], Awaitable[chat_pb2.Conversation]],
        quotas: Quotas | None = None,
    ) -> None:
        self._settings = settings
        self._quotas = quotas or Quotas(settings)
        self._producer = producer
        self._hot = hot
        self._read = read_conversation
        self._gate = ConversationGate()
        self._tasks: set[asyncio.Future[Any]] = set()
        # Conversations known to exist -> known to be closed. Redis stays the truth: a miss is
        # looked up there, and a close is read with every claim.
        self._registry: dict[Conversation, bool] = {}
        # Messages acked to their caller whose ack Redis has not recorded yet (see _settlement):
        # a retry in this process is answered from here rather than told to retry.
        self._unsettled: dict[ClaimKey, Ack] = {}
        # Conversations erased by `switchboard tenant erase` (follow_erasures): refused in
        # process memory, as every processor skips their events (streams/privacy/erasures.py).
        self._erasures: ErasureFollower | None = None
        # Conversations whose close, begun by a dead process, this one is finishing.
        self._finishing: set[Conversation] = set()

    def follow_erasures(self) -> None:
        """Refuse writes to erased conversations from now on (the server calls this at start).

        The erasure deletes the conversation's hot view, and this process's registry said it
        exists: its messages were acknowledged and then skipped downstream. The registry learns of
        a close from the claim script (the conversation hash's close); an erasure leaves nothing
        naming the conversation in Redis (that is its point), so each process follows the
        privacy topic as the processors do, and _admit checks it in memory: no Redis round trip."""
        if self._erasures is None:
            self._erasures = ErasureFollower(
                self._settings, self._forget_erased, start_timeout_s=self._settings.produce_timeout_s
            )
        self._erasures.begin()

    async def erasures_read(self) -> bool:
        """Wait for the erasure registry's first read, up to produce_timeout_s; whether it was
        read (else writes go on waiting for it, each bounded, and are refused UNAVAILABLE)."""
        try:
            await self._erased()
        except v.RequestRejected:
            return False
        return True

    @property
    def erasures_ready(self) -> bool:
        """Whether writes are checked against erasures without waiting: the registry was read
        once (or erasures are not followed). Until then every write waits for it, up to
        produce_timeout_s, and is refused UNAVAILABLE: the server's health says NOT_SERVING."""
        return self._erasures is None or self._erasures.ready

    async def stop_erasures(self) -> None:
        if self._erasures is not None:
            await self._erasures.stop()

    def _forget_erased(self, change: ErasureChange) -> None:
        """The registry drops what an erasure purged from the hot view: the conversations it
        erased (refused from now on anyway), and those of a tenant erased whole (looked up again).
        Handed only what changed: a conversation erasure costs a lookup per conversation, not a
        scan of the registry; a whole-tenant erasure (rare) scans it once."""
        registry = self._registry
        for conversation in change.conversations:
            registry.pop(conversation, None)
        if change.tenants:
            for conversation in [c for c in registry if c[0] in change.tenants]:
                del registry[conversation]

    async def _erased(self) -> Erasures | None:
        """The erasure registry (None: erasures not followed). Until it was read once, waits for
        it (bounded: UNAVAILABLE), so nothing is written while it is unknown."""
        follower = self._erasures
        if follower is None:
            return None
        if not follower.ready:
            try:
                await follower.start()
            except ErasuresUnavailable as exc:
                raise unavailable(f"{exc}; retry") from exc
        return follower.erasures

    async def refuse_if_erased(self, tenant_id: str, conversation_id: str) -> None:
        """FAILED_PRECONDITION for a conversation erased by `switchboard tenant erase` (checked
        before the hot view: `tenant erase` purges that only after it recorded the erasure)."""
        erased = await self._erased()
        if erased is not None and erased.conversation_erased(tenant_id, conversation_id):
            raise _erased_conversation(conversation_id)

    def _remember(self, conversation: Conversation, *, closed: bool) -> None:
        registry = self._registry
        if conversation not in registry and len(registry) >= REGISTRY_MAX:
            del registry[next(iter(registry))]  # the oldest entry: bounded memory
        registry[conversation] = closed

    async def _absent(self, tenant_id: str, conversation_id: str) -> v.RequestRejected:
        """Why a conversation the hot view does not have is refused (its callers checked
        refuse_if_erased first): NOT_FOUND only once the hot view is complete; while it is
        rebuilt, the conversation may exist (UNAVAILABLE)."""
        if await self._hot.is_ready(self._settings.topic_partitions):
            return _not_found(tenant_id, conversation_id)
        return unknown_while_rebuilding(tenant_id, conversation_id)

    # ------------------------------------------------------------------ messages

    async def accept_messages(
        self,
        requests: Sequence[chat_pb2.SendMessageRequest | v.MalformedRequest],
        traceparents: Sequence[str] | str = "",
        order: WriteOrder | None = None,
        on_admitted: Callable[[], None] | None = None,
        on_outcome: Callable[[int, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Validate, deduplicate and write a batch of messages; one outcome per request, in order.

        With `order`, this batch takes its turn in a stream (see WriteOrder). The write runs in a
        task of its own: cancelling the caller never cancels a write half-way. `on_admitted` is
        called once the batch is claimed and handed to the producer (before Kafka's acks).
        `on_outcome(i, outcome)` is called for request i as soon as its outcome is known (its
        record acked, or refused), which may be well before the batch's slowest record; requests
        repeating an earlier one's client_message_id in the batch get theirs only in the list."""
        if isinstance(traceparents, str):
            traceparents = [traceparents] * len(requests)
        results: list[Outcome | _Write | None] = [None] * len(requests)
        valid: list[tuple[int, chat_pb2.SendMessageRequest]] = []
        allowed = self._settings.allowed_tenants  # a property that parses the setting: once a batch
        for i, req in enumerate(requests):
            if isinstance(req, v.MalformedRequest):
                results[i] = req.rejection()
                continue
            try:
                v.check_tenant(req.tenant_id, allowed)
                v.check_conversation_id(req.conversation_id)
                v.check_client_message_id(req.client_message_id)
                v.check_text(req.text, self._settings.max_message_bytes)
            except v.RequestRejected as exc:
                results[i] = exc
                continue
            valid.append((i, req))

        followers: list[tuple[int, int]] = []  # (repeat, first) of a key within the batch
        settlements: list[asyncio.Task[None]] = []
        task = self._background(
            self._write_messages(valid, results, followers, traceparents, order, settlements)
        )
        try:
            await asyncio.shield(task)
        except Exception as exc:
            rejection = as_rejection(exc, "SendMessage, SendMessageBatch or SendMessages")
            for i, _ in valid:
                if results[i] is None:
                    results[i] = rejection
        if on_admitted is not None:
            on_admitted()
        if on_outcome is not None:
            written = dict(valid)
            repeats = {i for i, _ in followers}  # answered from their first's outcome, at the end
            for i, r in enumerate(results):
                if i in repeats:
                    continue
                if isinstance(r, _Write):
                    r.outcome.add_done_callback(
                        functools.partial(self._outcome_known, on_outcome, i, written[i], r)
                    )
                elif r is not None:
                    _tell(on_outcome, i, r)
        if settlements:
            # One wait for the whole batch: its settlement ends once every outcome is set.
            await asyncio.wait(settlements, timeout=self._settings.produce_timeout_s)
        outcomes: list[Outcome | None] = [
            self._answer(requests[i], r) if isinstance(r, _Write) else r  # type: ignore[arg-type]
            for i, r in enumerate(results)
        ]
        _resolve_followers(followers, outcomes, requests)
        final = [o if o is not None else _incident("SendMessages", "without an outcome") for o in outcomes]
        if order is not None:
            for req, outcome in zip(requests, final, strict=True):
                if _stops_the_conversation(outcome) and isinstance(req, chat_pb2.SendMessageRequest):
                    order.failed.add((req.tenant_id, req.conversation_id))
            for r in results:
                if isinstance(r, _Write):
                    order.answered((r.event.tenant_id, r.event.conversation_id), r.delivery)
        return final

    def _outcome_known(
        self,
        on_outcome: Callable[[int, Outcome], None],
        i: int,
        req: chat_pb2.SendMessageRequest,
        write: _Write,
        _: object,
    ) -> None:
        _tell(on_outcome, i, self._answer(req, write))

    def _answer(self, req: chat_pb2.SendMessageRequest, write: _Write) -> Outcome:
        if not write.outcome.done():
            return unavailable(
                f"Kafka did not acknowledge within {self._settings.produce_timeout_s:.0f}s; the write may "
                "still land — retry with the same client_message_id",
                late_possible=True,
            )
        ack = write.outcome.result()
        return ack_response(req, ack, duplicate=False) if isinstance(ack, Ack) else ack

    async def _write_messages(
        self,
        valid: list[tuple[int, chat_pb2.SendMessageRequest]],
        results: list[Outcome | _Write | None],
        followers: list[tuple[int, int]],
        traceparents: Sequence[str],
        order: WriteOrder | None,
        settlements: list[asyncio.Task[None]],
    ) -> None:
        """Fills `results` for `valid`, `followers` with the repeats of a key in the batch, and
        `settlements` with the task that records the outcomes once Kafka answered."""
        granted = 0
        handed: list[_Write] = []
        try:
            # Before the turn (batches of a stream overlap here): registry, slots, claims (which
            # also read whether the conversation was closed meanwhile, by any ingress process).
            writers = await self._admit(valid, results, followers) if valid else []
            granted = self._producer.reserve_up_to(len(writers))
            claims = await self._claim_messages([_claim_key(req) for _, req in writers[:granted]])
            if order is not None:
                await order.wait_turn()
            # Only a stream orders its messages: coalesced unary calls are independent callers,
            # and one's failure must not ABORT another's message of the same conversation.
            failed = order.failed if order is not None else None
            dropped: list[tuple[HeldClaim, Ack | None]] = []
            written = 0
            try:
                # One deadline for handing the whole batch to the producer (no timer per message).
                async with asyncio.timeout(self._settings.produce_timeout_s):
                    for n, (i, req) in enumerate(writers):
                        claim = claims[n] if n < granted else None
                        outcome = await self._write_one(req, claim, order, traceparents[i])
                        results[i] = outcome
                        written = n + 1
                        if isinstance(outcome, _Write):
                            handed.append(outcome)
                            continue
                        if failed is not None and _stops_the_conversation(outcome):
                            failed.add((req.tenant_id, req.conversation_id))
                        unknown = (
                            isinstance(outcome, v.RequestRejected)
                            and outcome.code == grpc.StatusCode.INTERNAL
                        )
                        if claim is not None and claim.claimed and not unknown:
                            # Never handed to the producer: nothing can land, so the claim goes.
                            dropped.append((claim.held(_claim_key(req)), None))
            except TimeoutError:
                # Kafka's buffer stayed full for the whole produce timeout: the rest was not handed.
                for n in range(written, len(writers)):
                    i, req = writers[n]
                    results[i] = unavailable(
                        f"Kafka did not accept the event within {self._settings.produce_timeout_s:.0f}s; retry"
                    )
                    if failed is not None:
                        failed.add((req.tenant_id, req.conversation_id))
                    if n < granted and claims[n].claimed:
                        dropped.append((claims[n].held(_claim_key(req)), None))
            await self._settle(dropped)
        finally:
            self._producer.release(granted - len(handed))
            settlement = self._settle_when_answered(handed)
            if settlement is not None:
                settlements.append(settlement)
            if order is not None:
                await order.wait_turn()
                order.end_turn()

    async def _admit(
        self,
        valid: list[tuple[int, chat_pb2.SendMessageRequest]],
        results: list[Outcome | _Write | None],
        followers: list[tuple[int, int]],
    ) -> list[tuple[int, chat_pb2.SendMessageRequest]]:
        """The requests that may write: known, open conversations; the first of each key.

        Conversations are looked up in the process's registry first, and in Redis only when not
        there: a conversation, once started, exists for good. Whether it is closed is answered by
        the claim (claim_many unless_closed), also for one known closed: a retry of a message
        written before the close still gets its ack there (duplicate=true), the rest FAILED_PRECONDITION."""
        registry = self._registry
        erased = await self._erased()
        missing = sorted({(req.tenant_id, req.conversation_id) for _, req in valid} - registry.keys())
        ready = True
        if missing:
            for conversation, reg in zip(missing, await self._hot.lookup_many(missing), strict=True):
                if reg is not None:
                    self._remember(conversation, closed=_is_closed(reg))
            if any(c not in registry for c in missing):
                # Unknown to an incomplete hot view is not "does not exist" (see _absent).
                ready = await self._hot.is_ready(self._settings.topic_partitions)
        first: dict[ClaimKey, int] = {}
        writers = []
        for i, req in valid:
            if erased is not None and erased.conversation_erased(req.tenant_id, req.conversation_id):
                results[i] = _erased_conversation(req.conversation_id)
            elif (req.tenant_id, req.conversation_id) not in registry:
                results[i] = (
                    _not_found(req.tenant_id, req.conversation_id)
                    if ready
                    else unknown_while_rebuilding(req.tenant_id, req.conversation_id)
                )
            elif _claim_key(req) in first:
                followers.append((i, first[_claim_key(req)]))
            else:
                first[_claim_key(req)] = i
                writers.append((i, req))
        return writers

    async def _write_one(
        self,
        req: chat_pb2.SendMessageRequest,
        claim: Claim | None,
        order: WriteOrder | None,
        traceparent: str,
    ) -> Outcome | _Write:
        """In the batch's turn and in request order: hand one message to the producer, or why not."""
        conversation = (req.tenant_id, req.conversation_id)
        if claim is not None and claim.earlier is not None:
            if _reused(claim.earlier, hv.claim_digest(req.text)):
                return _reused_key(req.client_message_id, claim.earlier)
            return ack_response(req, claim.earlier, duplicate=True)
        if claim is not None and claim.closed:
            self._remember(conversation, closed=True)
            return _closed(req.conversation_id)
        if claim is not None and claim.closing:
            return _being_closed(req.conversation_id)
        generation = self._producer.generation  # the producer the enqueue below binds (no await between)
        if order is not None and (conversation in order.failed or order.stopped(conversation, generation)):
            return _after_failure(req)
        if claim is None:
            return self._producer.exhausted()
        if not claim.claimed:
            return unavailable(
                f"client_message_id {req.client_message_id!r} is being written by an earlier attempt; "
                "retry shortly to get its ack"
            )
        if not self._hot.lease_fresh():
            # Another process may have taken this claim over (see LEASE_FRESH_S): the caller
            # drops it (only while it is still this attempt's) and the client retries.
            return _lease_stale()
        if not self._gate.begin_send(conversation):
            return _being_closed(req.conversation_id)
        if self._registry.get(conversation):
            # Closed in this process after this message was claimed (a batch claims before its
            # turn): the close is in the log already, so writing now would land after it. The
            # caller drops the claim of this refusal.
            self._gate.end_send(conversation)
            return _closed(req.conversation_id)
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            message_received=events_pb2.MessageReceived(
                client_message_id=req.client_message_id, text=req.text, sender=events_pb2.SENDER_CUSTOMER
            ),
        )
        try:
            # Bounded by the batch's deadline (see _write_messages).
            delivery = await self._producer.enqueue(event, bounded=False)
        except Unavailable as exc:
            return exc
        except Exception:
            # The record may or may not be in the producer's buffer: the claim stays until it expires.
            return _incident("SendMessage", f"handing {req.client_message_id!r} to the producer")
        finally:
            self._gate.end_send(conversation)
        if order is not None:
            order.handed(conversation, delivery, generation)
        return _Write(event, delivery, claim.held(_claim_key(req)))

    # ------------------------------------------------------------------ claims

    def _settle_when_answered(self, writes: list[_Write]) -> asyncio.Task[None] | None:
        return self._background(self._settlement(writes)) if writes else None

    async def _settlement(self, writes: list[_Write]) -> None:
        """Waits as long as Kafka takes (keeping the claims alive), then records each outcome and
        frees its in-flight slot, a partition's worth at a time as its acks arrive. Runs apart
        from any caller; one callback per record, no re-scan of what is still pending."""
        arrived: list[_Write] = []
        wake = asyncio.Event()

        def on_delivery(write: _Write, _: object) -> None:
            arrived.append(write)
            wake.set()

        for w in writes:
            w.delivery.add_done_callback(functools.partial(on_delivery, w))
        left = len(writes)
        while left:
            if not arrived:
                try:
                    async with asyncio.timeout(CLAIM_TTL_S / 3):
                        await wake.wait()
                except TimeoutError:
                    with contextlib.suppress(Exception):
                        await self._hot.touch_claims(
                            [w.claim for w in writes if w.claim is not None and not w.delivery.done()]
                        )
                    continue
            wake.clear()
            finished = arrived[:]
            del arrived[:]
            left -= len(finished)
            answers = await self._producer.wait_acks(
                [w.event for w in finished], [w.delivery for w in finished], [None] * len(finished)
            )
            self._producer.release(len(finished))
            # An outcome that is unknown (the producer failed with the record maybe written, see
            # EventProducer._sender_ended) settles nothing and takes no next step: its claim (a
            # close's hold, a start's reservation) stays pending until this process, which stops,
            # has its lease ended; then a retry takes it over from what the log holds.
            unknown = [isinstance(a, Unavailable) and a.late_possible for a in answers]
            outcomes = [
                (w.claim, a if isinstance(a, Ack) else None)
                for w, a, lost in zip(finished, answers, unknown, strict=True)
                if w.claim is not None and not lost
            ]
            if any(w.after is not None for w in finished) or any(a is None for _, a in outcomes):
                # A start's or a close's next step (registering, marking closed) follows its
                # settle; so does a failure's answer (its retry must find the claim released).
                await self._settle(outcomes)
            else:
                # Messages: the ack is durable once Kafka has it, so callers are answered now and
                # Redis records the outcomes meanwhile (one round trip less per ack). Until it
                # has, a retry here is answered from _unsettled; a retry in another process
                # finds the claim pending and is told to retry shortly, as during any write.
                self._background(self._settle_acked(outcomes, self._remember_unsettled(outcomes)))
            for w, answer, lost in zip(finished, answers, unknown, strict=True):
                if w.after is not None and not lost:
                    try:
                        await w.after(answer if isinstance(answer, Ack) else None)
                    except Exception:
                        log.exception("after-write step of event %s failed", w.event.event_id)
                w.outcome.set_result(answer)

    async def _settle(
        self, outcomes: list[tuple[HeldClaim, Ack | None]], within_s: float = 0.0
    ) -> asyncio.Task[None] | None:
        """Record outcomes of claims; Redis being away must not turn a durable write into an
        error for its caller, so this retries in the background until Redis takes it (the task
        returned, None when the first attempt did). `within_s`: the first attempt may wait that
        long for another round trip to ride with (IngressHotView.settle_many)."""
        if not outcomes:
            return None
        try:
            await self._hot.settle_many(outcomes, within_s=within_s)
        except Exception as exc:
            log.warning(
                "recording %d write outcomes failed (%r); retrying in the background", len(outcomes), exc
            )
            return self._background(
                _retrying(lambda: self._hot.settle_many(outcomes), f"recording {len(outcomes)} outcomes")
            )
        return None

    def _remember_unsettled(self, outcomes: list[tuple[HeldClaim, Ack | None]]) -> list[ClaimKey]:
        """Remember acks before their callers are answered (so before any retry can come)."""
        keys = []
        for claim, ack in outcomes:
            if ack is not None:
                key = (claim.tenant_id, claim.conversation_id, claim.client_message_id)
                self._unsettled[key] = ack
                keys.append(key)
        return keys

    async def _settle_acked(self, outcomes: list[tuple[HeldClaim, Ack | None]], keys: list[ClaimKey]) -> None:
        """_settle for messages already answered; forgets their acks in _unsettled once Redis has
        them (or its retries gave up)."""
        try:
            retry = await self._settle(outcomes, SETTLE_ACKED_WITHIN_S)
            if retry is not None:
                with contextlib.suppress(Exception):
                    await retry
        finally:
            for key in keys:
                self._unsettled.pop(key, None)

    async def _claim_messages(self, keys: list[ClaimKey]) -> list[Claim]:
        """claim_many for messages (into their conversation's in-flight set, unless closed). A key
        still pending in Redis that this process acked a moment ago (its settle on its way, see
        _settlement) comes back as the earlier ack it is, so every caller answers it as one."""
        claims = self._known_acks(
            keys, await self._hot.claim_many(keys, self._settings.topic_partitions, unless_closed=True)
        )
        try:
            await self._take_over(keys, claims)
            # A claim pending in another process is most often a write acked a moment ago whose
            # record is on its way to Redis (a retry right after its ack): look again for a
            # moment before refusing it as in flight (a claim the earlier attempt drops
            # meanwhile is ours).
            waited, delay = 0.0, IN_FLIGHT_RECHECK_S
            while waited < IN_FLIGHT_WAIT_S and (
                pending := [n for n, c in enumerate(claims) if c.in_flight and not c.orphaned]
            ):
                await asyncio.sleep(delay)
                waited, delay = waited + delay, min(delay * 2, IN_FLIGHT_WAIT_S / 4)
                again = await self._hot.claim_many(
                    [keys[n] for n in pending], self._settings.topic_partitions, unless_closed=True
                )
                for n, claim in zip(
                    pending, self._known_acks([keys[n] for n in pending], again), strict=True
                ):
                    claims[n] = claim
        except BaseException:
            # The claims this call holds already would refuse every retry for CLAIM_TTL_S (this
            # process lives on, so no one takes them over): nothing was written under them.
            held: list[tuple[HeldClaim, Ack | None]] = [
                (c.held(k), None) for c, k in zip(claims, keys, strict=True) if c.claimed
            ]
            if held:
                with contextlib.suppress(Exception):
                    await self._settle(held)
            raise
        return claims

    async def _take_over(
        self,
        keys: list[ClaimKey],
        claims: list[Claim],
        *,
        unless_closed: bool = True,
        dead_if_ended: bool = False,
    ) -> None:
        """Claims pending in an attempt of a process that died (its lease ran out or was ended)
        are claimed by this attempt, but only once the sessions worker has folded each such
        key's partition up to where the log ends now: had the dead attempt's record landed, the
        fold has recorded its ack in the claim by then, and the retry is answered that ack
        (duplicate=true) instead of being written a second time. Within TAKEOVER_WAIT_S, or the
        key stays in flight (UNAVAILABLE: retry). The same for a start's or close's claim
        (`unless_closed` False), and for a message of a conversation held by a dead process's
        close: had the close landed, the fold has marked the conversation closed by then."""
        orphans = [n for n, c in enumerate(claims) if c.orphaned]
        if not orphans:
            return
        try:
            deadline = time.monotonic() + TAKEOVER_WAIT_S
            by_partition: dict[int, list[int]] = {}
            for n in orphans:
                partition = await self._producer.partition_for(keys[n][1], TAKEOVER_WAIT_S)
                by_partition.setdefault(partition, []).append(n)
            ends = {p: await self._producer.end_offset(p, TAKEOVER_WAIT_S) for p in by_partition}
            while True:
                applied = await self._hot.applied_offsets(list(ends))
                if all(applied.get(p, -1) >= end for p, end in ends.items()):
                    break
                if time.monotonic() > deadline:
                    log.warning(
                        "claims of a dead ingress process not taken over: the sessions worker has not "
                        "folded partitions %s to their end (%s) within %.1fs",
                        sorted(ends),
                        applied,
                        TAKEOVER_WAIT_S,
                    )
                    return
                await asyncio.sleep(TAKEOVER_POLL_S)
            mine = [keys[n] for n in orphans]
            again = await self._hot.claim_many(
                mine,
                self._settings.topic_partitions,
                unless_closed=unless_closed,
                take_over=True,
                dead_if_ended=dead_if_ended,
            )
        except Exception as exc:
            log.warning("taking over claims of a dead ingress process failed (%r); they stay in flight", exc)
            return
        for n, claim in zip(orphans, self._known_acks(mine, again), strict=True):
            claims[n] = claim
            if claim.closing and claim.orphaned:
                # Held by a dead process's close that is not in the log (the fold is past where
                # the log ended): finish it (the message is refused "being closed" meanwhile).
                self._finish_dead_close(keys[n][0], keys[n][1])

    def _finish_dead_close(self, tenant_id: str, conversation_id: str) -> None:
        """Close, on the system's behalf, a conversation whose close a dead ingress process began
        and did not finish. Its hold is never just dropped: that process may be stalled, not dead,
        its close still to land, and a message acknowledged meanwhile would land after it (the fold
        ignores such messages). Finished here, a late copy is a second close, which the fold
        ignores; and the close was asked for, by whoever called it."""
        conversation = (tenant_id, conversation_id)
        if conversation in self._finishing:
            return
        self._finishing.add(conversation)

        def done(task: asyncio.Task[bool]) -> None:
            self._finishing.discard(conversation)
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.warning(
                    "finishing the close of %r begun by a dead process failed: %r", conversation_id, exc
                )

        self._background(
            self.close_for_system(tenant_id, conversation_id, DEAD_CLOSE_RESOLUTION)
        ).add_done_callback(done)

    def _known_acks(self, keys: list[ClaimKey], claims: list[Claim]) -> list[Claim]:
        if not self._unsettled:
            return claims
        return [
            Claim(claimed=False, earlier=acked)
            if not c.claimed and c.earlier is None and (acked := self._unsettled.get(k)) is not None
            else c
            for c, k in zip(claims, keys, strict=True)
        ]

    async def drain(self, within_s: float) -> None:
        """Wait (at most `within_s`) for writes and settlements still running (a stopping ingress)."""
        deadline = time.monotonic() + within_s
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)

    def _background(self, coro: Coroutine[Any, Any, R]) -> asyncio.Task[R]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        """Its outcome is its caller's; a caller that left (its deadline) never reads it, and
        asyncio logged each such refusal as "Task exception was never retrieved" with a trace."""
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, v.RequestRejected):
            log.debug("a write whose caller left ended with %r", exc)
        else:
            log.warning("a write whose caller may have left failed: %r", exc)

    async def _publish(
        self,
        event: Event,
        claim: HeldClaim | None,
        after: Callable[[Ack | None], Awaitable[None]] | None,
        gate: Conversation | None = None,
    ) -> Ack:
        """One record, claimed already: produce it and wait for its outcome (the caller shields it).

        With `gate`, the caller holds `begin_send` of that conversation; it ends once the record
        is handed to the producer (or refused), so a close waits for it."""
        try:
            if claim is not None and not self._hot.lease_fresh():
                # Another process may be taking this claim over (see LEASE_FRESH_S).
                raise _lease_stale()
            self._producer.reserve()
        except v.RequestRejected:
            if gate is not None:
                self._gate.end_send(gate)
            if claim is not None:
                await self._settle([(claim, None)])
            if after is not None:
                await after(None)
            raise
        try:
            delivery = await self._producer.enqueue(event)
        except BaseException as exc:
            self._producer.release()
            if gate is not None:
                self._gate.end_send(gate)
                gate = None
            if claim is not None and isinstance(exc, Unavailable):
                await self._settle([(claim, None)])
            if after is not None and isinstance(exc, Exception):
                await after(None)
            raise
        finally:
            if gate is not None:
                self._gate.end_send(gate)
        write = _Write(event, delivery, claim, after)
        self._settle_when_answered([write])
        await asyncio.wait([write.outcome], timeout=self._settings.produce_timeout_s)
        if not write.outcome.done():
            raise unavailable(
                f"Kafka did not acknowledge within {self._settings.produce_timeout_s:.0f}s; the write may "
                "still land — retry the same request",
                late_possible=True,
            )
        answer = write.outcome.result()
        if isinstance(answer, Ack):
            return answer
        raise answer

    # ------------------------------------------------------------------ single events

    async def publish(self, event: Event, traceparent: str = "") -> Ack:
        """Write one event that needs no claim (a decision such as AgentAssigned or CsatRated) and
        return Kafka's ack. Runs in a task of its own: a cancelled caller never cuts it half-way."""
        if traceparent and not event.trace.traceparent:
            event.trace.traceparent = traceparent
        return await asyncio.shield(self._background(self._publish(event, None, None)))

    async def publish_claimed(self, event: Event, claim_key: ClaimKey) -> tuple[Ack, bool]:
        """Write a message-like event once per (tenant, conversation, client id): claims the key
        like SendMessage does (gated on the hot view's readiness), takes its turn with closes of
        the conversation, and returns (ack, duplicate). A key already written returns its first
        ack with duplicate=True; one still in flight is UNAVAILABLE."""
        return await asyncio.shield(self._background(self._publish_claimed(event, claim_key)))

    async def _publish_claimed(self, event: Event, claim_key: ClaimKey) -> tuple[Ack, bool]:
        await self.refuse_if_erased(claim_key[0], claim_key[1])
        # unless_closed: the message joins the conversation's in-flight set, which a close (in
        # any process) waits to drain before it publishes.
        (claim,) = await self._claim_messages([claim_key])
        if claim.earlier is not None:
            if _reused(claim.earlier, hv.event_claim_digest(event)):
                raise _reused_key(claim_key[2].removeprefix(hv.AGENT_CLAIM_PREFIX), claim.earlier)
            return claim.earlier, True
        if claim.closed:
            raise _closed(claim_key[1])
        if claim.closing:
            raise _being_closed(claim_key[1])
        if not claim.claimed:
            client_id = claim_key[2].removeprefix(hv.AGENT_CLAIM_PREFIX)  # the id the caller sent
            raise unavailable(
                f"client_message_id {client_id!r} is being written by an earlier attempt; "
                "retry shortly to get its ack"
            )
        held = claim.held(claim_key)
        conversation = (claim_key[0], claim_key[1])
        if not self._hot.lease_fresh():
            await self._settle([(held, None)])
            raise _lease_stale()
        if not self._gate.begin_send(conversation):
            await self._settle([(held, None)])
            raise _being_closed(claim_key[1])
        if self._registry.get(conversation):
            # Closed in this process since the caller checked: the close is durable already.
            self._gate.end_send(conversation)
            await self._settle([(held, None)])
            raise _closed(conversation[1])
        return await self._publish(event, held, None, gate=conversation), False

    async def rate_conversation(
        self, req: chat_pb2.RateConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        """CSAT for a conversation, open or closed (rating usually follows the close); a later
        rating replaces an earlier one."""
        v.check_tenant(req.tenant_id, self._settings.allowed_tenants)
        v.check_conversation_id(req.conversation_id)
        v.check_score(req.score)
        v.check_short_text(req.comment, "comment", v.MAX_CSAT_COMMENT)
        await self.refuse_if_erased(req.tenant_id, req.conversation_id)
        if await self._hot.lookup(req.tenant_id, req.conversation_id) is None:
            raise await self._absent(req.tenant_id, req.conversation_id)
        event = new_event(
            req.tenant_id,
            req.conversation_id,
            traceparent=traceparent,
            csat_rated=events_pb2.CsatRated(score=req.score, comment=req.comment),
        )
        await self.publish(event)
        return await self._read(req.tenant_id, req.conversation_id)

    # ------------------------------------------------------------------ start and close

    async def start_conversation(
        self, req: chat_pb2.StartConversationRequest, traceparent: str = ""
    ) -> chat_pb2.Conversation:
        s = self._settings
        v.check_tenant(req.tenant_id, s.allowed_tenants)
        v.check_conversation_id(req.conversation_id, required=False)
        if req.channel not in _CHANNELS:
            raise v.invalid(f"channel {req.channel} is not a switchboard.v1.Channel value")
        v.check_customer_id(req.customer_id)
        v.check_one_line(req.locale, "locale", 35)
        v.check_metadata(dict(req.metadata), s.max_metadata_entries)
        if req.conversation_id:
            # Its start claim went with the erasure: it would start again, and be skipped.
            await self.refuse_if_erased(req.tenant_id, req.conversation_id)
        if req.conversation_id and await self._hot.lookup(req.tenant_id, req.conversation_id) is not None:
            return _started_again(req, await self._read(req.tenant_id, req.conversation_id))
        return await asyncio.shield(self._background(self._start(req, traceparent)))

    async def _start(self, req: chat_pb2.StartConversationRequest, traceparent: str) -> chat_pb2.Conversation:
        conversation_id = req.conversation_id or new_event_id()
        held: HeldClaim | None = None
        if req.conversation_id:
            claim_key = (req.tenant_id, conversation_id, hv.START_CLAIM)
            claim, _ = await self._claim_start_or_close(claim_key)
            if not claim.claimed:
                if claim.earlier is not None:
                    return _started_again(req, await self._read(req.tenant_id, conversation_id))
                raise unavailable(f"conversation {conversation_id!r} is being started by an earlier attempt")
            held = claim.held(claim_key)
        elif not await self._hot.is_ready(self._settings.topic_partitions):
            raise rebuilding()
        reserved = False
        quota = self._quotas.open_conversations(req.tenant_id)
        if quota > 0:
            try:
                reserved, open_now = await self._hot.reserve_open(req.tenant_id, conversation_id, quota)
            except BaseException:
                if held is not None:
                    await self._settle([(held, None)])
                raise
            if not reserved:
                if held is not None:
                    await self._settle([(held, None)])
                raise too_many_open(req.tenant_id, open_now, quota)
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

        async def register(ack: Ack | None) -> None:
            if ack is None:
                if reserved:
                    with contextlib.suppress(Exception):  # else it expires with the claim TTL
                        await self._hot.release_open(req.tenant_id, conversation_id)
                return
            # Durable in the log, so it exists: its first messages need no lookup.
            self._remember((req.tenant_id, conversation_id), closed=False)
            if reserved:
                # Its place is for good now (the worker's fold says so too, but it may lag past
                # the reservation's expiry: a replay, a stopped worker).
                with contextlib.suppress(Exception):
                    await self._hot.confirm_open(req.tenant_id, conversation_id)
            try:
                await self._hot.register(
                    req.tenant_id,
                    conversation_id,
                    created_ns=event.occurred_at.ToNanoseconds(),
                    channel=req.channel,
                    customer_id=req.customer_id,
                )
            except Exception as exc:
                # The start is durable; the sessions worker registers it too when it folds the event.
                log.warning("registering conversation %s failed (%r); the worker will", conversation_id, exc)

        await self._publish(event, held, register)
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
        await self.refuse_if_erased(req.tenant_id, req.conversation_id)
        reg = await self._hot.lookup(req.tenant_id, req.conversation_id)
        if reg is None:
            raise await self._absent(req.tenant_id, req.conversation_id)
        if not _is_closed(reg):
            await asyncio.shield(self._background(self._close(req, traceparent)))
        # Closing a closed conversation is a no-op, so a retried close is safe.
        return await self._read(req.tenant_id, req.conversation_id)

    async def close_for_system(self, tenant_id: str, conversation_id: str, resolution: str) -> bool:
        """Close an open conversation on the system's behalf (the idle close, services/ingress/
        _idle.py) by the same hold, wait and publish as CloseConversation, so a send racing it is
        before the close in the log or refused; False when it is closed (or unknown) already."""
        try:
            await self.refuse_if_erased(tenant_id, conversation_id)
        except v.RequestRejected:
            return False  # erased (its keys must not come back), or the registry not read yet
        reg = await self._hot.lookup(tenant_id, conversation_id)
        if reg is None or _is_closed(reg):
            return False
        req = chat_pb2.CloseConversationRequest(
            tenant_id=tenant_id, conversation_id=conversation_id, resolution=resolution
        )
        await asyncio.shield(self._background(self._close(req, "", events_pb2.SENDER_SYSTEM)))
        return True

    async def _close(
        self,
        req: chat_pb2.CloseConversationRequest,
        traceparent: str,
        closed_by: events_pb2.Sender = events_pb2.SENDER_CUSTOMER,
    ) -> None:
        conversation = (req.tenant_id, req.conversation_id)
        if not await self._gate.close(conversation):
            raise unavailable(
                f"conversation {req.conversation_id!r} is being closed by an earlier call; retry"
            )
        reopen = True
        try:
            claim_key = (req.tenant_id, req.conversation_id, hv.CLOSE_CLAIM)
            claim, taken_over = await self._claim_start_or_close(claim_key)
            if not claim.claimed:
                if claim.earlier is None:
                    raise unavailable(
                        f"conversation {req.conversation_id!r} is being closed by an earlier attempt"
                    )
                # Durable already (an earlier attempt stopped before the hot view said so).
                await self._hot.mark_closed(*conversation, _uuid7_ns(claim.earlier.event_id))
                return
            held = claim.held(claim_key)
            # Sends of the conversation stop in every ingress process, and the close is published
            # only once every message claimed before that is settled: whatever was acknowledged
            # is before the close in the log (the fold ignores messages after a close).
            try:
                await self._wait_in_flight(req.tenant_id, req.conversation_id, held.marker)
            except BaseException:
                # The hold first: once the claim is dropped another close may claim and hold. A
                # close taken over from a dead process keeps it until it expires: that process's
                # own close may still land (it may be stalled, not dead).
                if not taken_over:
                    await self._release_hold(conversation, held.marker)
                await self._settle([(held, None)])
                raise
            event = new_event(
                req.tenant_id,
                req.conversation_id,
                traceparent=traceparent,
                conversation_closed=events_pb2.ConversationClosed(
                    resolution=req.resolution, closed_by=closed_by
                ),
            )

            async def closed(ack: Ack | None) -> None:
                # Only a durable close closes the hot view; senders wait at the gate until then.
                try:
                    if ack is not None:
                        # Durable: this process refuses later sends (also ones claimed before the
                        # close, see _write_one) before the gate reopens, even if Redis is away.
                        self._remember(conversation, closed=True)
                        await _retrying(
                            lambda: self._hot.mark_closed(*conversation, event.occurred_at.ToNanoseconds()),
                            f"marking {req.conversation_id!r} closed",
                        )
                    elif not taken_over:
                        # Not in the log: sends may go on (after a taken-over close, once the
                        # hold expires, as above).
                        await self._release_hold(conversation, held.marker)
                finally:
                    self._gate.reopen(conversation)

            reopen = False  # from here on `closed` reopens the gate, once Kafka answered
            await self._publish(event, held, closed)
        finally:
            if reopen:
                self._gate.reopen(conversation)

    async def _claim_start_or_close(self, claim_key: ClaimKey) -> tuple[Claim, bool]:
        """The claim of a start or a close, and whether it was taken over: one pending in an
        attempt of a dead ingress process is (see _take_over), so its retry need not wait for the
        claim to expire. A start's once that process's lease ran out (had it only stalled, its own
        start may land later: a second start, which the fold ignores); a close's only once its
        lease was ended (it is dead: see _CLAIM_IF_READY)."""
        closing = claim_key[2] == hv.CLOSE_CLAIM
        claims = await self._hot.claim_many(
            [claim_key], self._settings.topic_partitions, dead_if_ended=closing
        )
        if not claims[0].orphaned:
            return claims[0], False
        await self._take_over([claim_key], claims, unless_closed=False, dead_if_ended=closing)
        return claims[0], claims[0].claimed

    async def _release_hold(self, conversation: Conversation, owner: bytes) -> None:
        """Let sends of the conversation go on after a close that did not happen; if Redis is
        away, keep trying in the background (only this attempt's own hold is ever removed), so a
        blip does not refuse the conversation's sends until the hold expires."""
        try:
            await self._hot.release_close(*conversation, owner)
        except Exception as exc:
            log.warning("releasing the close hold of %r failed (%r); retrying", conversation[1], exc)
            self._background(
                _retrying(
                    lambda: self._hot.release_close(*conversation, owner),
                    f"releasing the close hold of {conversation[1]!r}",
                )
            )

    async def _wait_in_flight(self, tenant_id: str, conversation_id: str, owner: bytes) -> None:
        """Hold the conversation for its close and wait until no other ingress process has a
        claimed message of it unsettled; UNAVAILABLE if that takes longer than a produce timeout
        (Kafka is slow, or a process died holding one: its entry expires with the claim)."""
        deadline = time.monotonic() + self._settings.produce_timeout_s
        pause = 0.002
        while await self._hot.hold_for_close(tenant_id, conversation_id, owner):
            if time.monotonic() > deadline:
                raise unavailable(
                    f"conversation {conversation_id!r} has messages still being written; retry the close"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


class BatchGate:
    """When the next group-commit batch of unary calls (MessageBatcher) may leave: when no batch
    under way holds it back, or once `max_batch` calls wait. A batch holds the next one back until
    every call of it is answered (claimed, written and acknowledged by Kafka, or refused; not
    later, when the acks are recorded in Redis: nobody waits for that), for `hold_s` at most, which bounds
    what a slow batch (a partition whose leader is away, Kafka's produce timeout) costs the calls
    behind it; each call inside a batch is answered as soon as its own record is acked
    (accept_messages' on_outcome).

    So a lone call never waits, and under load batches grow instead of each call paying its own
    round trips: grpc.aio hands the server one call per loop iteration, so per-tick coalescing made
    batches of 1, and letting the next batch go once the previous one was handed to the producer
    made batches of ~2.6 with 10 calls in flight. Tried and measured worse at 100 calls in flight:
    letting a second batch overlap the first once it was handed to the producer and at least as
    many calls waited as it carried. `wake` is called whenever a batch stops holding. Measured:
    benchmarks/RESULTS.md, "Unary SendMessage batches" (sixteenth session)."""

    def __init__(self, wake: Callable[[], None], max_batch: int, hold_s: float = 0.05) -> None:
        self._wake = wake
        self._max_batch = max_batch
        self._hold_s = hold_s
        self._holding = 0

    def may_leave(self, waiting: int) -> bool:
        return waiting >= self._max_batch or (waiting > 0 and self._holding == 0)

    def leaving(self) -> Callable[[], None]:
        """A batch leaves: returns what to call when it is over (answered, failed or cancelled);
        it acts once, and the batch's hold ends by itself after `hold_s`."""
        self._holding += 1
        release = once(self._release)
        timer = asyncio.get_running_loop().call_later(self._hold_s, release)

        def finished() -> None:
            timer.cancel()
            release()

        return once(finished)

    def _release(self) -> None:
        self._holding -= 1
        self._wake()


_Pending = tuple[
    chat_pb2.SendMessageRequest | v.MalformedRequest,
    str,
    "asyncio.Future[chat_pb2.SendMessageResponse | v.RequestRejected]",
]


class MessageBatcher:
    """Coalesces concurrent unary SendMessage calls into `accept_messages` batches, group-commit
    style: a call leaves at the end of its event-loop tick when the gate lets it (see BatchGate),
    else it waits and leaves with the calls that arrived meanwhile. A caller gone (cancelled,
    deadline passed) before its batch leaves is not written."""

    def __init__(self, service: ConversationWrites, max_batch: int = 512, hold_s: float = 0.05) -> None:
        self._service = service
        self._max_batch = max_batch
        self._gate = BatchGate(self._schedule, max_batch, hold_s)
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._running: set[asyncio.Task[None]] = set()

    async def submit(
        self, request: chat_pb2.SendMessageRequest | v.MalformedRequest, traceparent: str
    ) -> chat_pb2.SendMessageResponse | v.RequestRejected:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[chat_pb2.SendMessageResponse | v.RequestRejected] = loop.create_future()
        self._pending.append((request, traceparent, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if not self._flush_scheduled and self._gate.may_leave(len(self._pending)):
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pending = [p for p in self._pending if not p[2].done()]  # callers gone meanwhile
        while self._gate.may_leave(len(self._pending)):
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            finished = self._gate.leaving()
            task = asyncio.ensure_future(self._run(batch, finished))
            self._running.add(task)
            # A done callback, not a `finally` in _run: also for a task cancelled before it ran.
            task.add_done_callback(functools.partial(self._finished, batch=batch, finished=finished))

    def _finished(
        self, task: asyncio.Task[None], batch: list[_Pending], finished: Callable[[], None]
    ) -> None:
        self._running.discard(task)
        finished()
        for _, _, future in batch:
            if not future.done():  # the task was cancelled (the server is stopping) or failed
                future.set_result(
                    unavailable(
                        "the write of this message was interrupted; retry with the same client_message_id",
                        late_possible=True,
                    )
                )
        if not task.cancelled() and task.exception() is not None:
            log.error("a batch of unary SendMessage calls failed", exc_info=task.exception())

    async def _run(self, batch: list[_Pending], finished: Callable[[], None]) -> None:
        told: set[int] = set()

        def answer(i: int, outcome: Outcome) -> None:
            # A call is answered as soon as its own record is acked (or refused), not when the
            # batch's slowest record is (a partition whose leader is away, say).
            future = batch[i][2]
            if not future.done():
                future.set_result(outcome)
            told.add(i)
            if len(told) == len(batch):
                # Every call has its answer: the next batch goes now, not after this one's
                # settlement (the acks recorded in Redis, one more round trip nobody waits for).
                finished()

        try:
            outcomes = await self._service.accept_messages(
                [r for r, _, _ in batch], [t for _, t, _ in batch], on_outcome=answer
            )
        except Exception as exc:
            outcomes = [as_rejection(exc, "SendMessage")] * len(batch)
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)


def once(action: Callable[[], object]) -> Callable[..., None]:
    """`action`, run by the first call only, whatever its arguments (a timer, a task's done
    callback and a caller may all call it)."""
    pending = [action]

    def run(*_: object) -> None:
        if pending:
            pending.pop()()

    return run


def _tell(on_outcome: Callable[[int, Outcome], None], i: int, outcome: Outcome) -> None:
    """An early answer; its failure must not fail the batch (the list answers everyone anyway)."""
    try:
        on_outcome(i, outcome)
    except Exception:
        log.exception("answering request %d of a batch early failed", i)


def _claim_key(req: chat_pb2.SendMessageRequest) -> ClaimKey:
    return (req.tenant_id, req.conversation_id, req.client_message_id)


def _stops_the_conversation(outcome: Outcome) -> bool:
    """Any failure of a message a retry could still write; refusals of the request itself
    (invalid, unknown or closed conversation) and ABORTED (already counted) do not."""
    return isinstance(outcome, v.RequestRejected) and outcome.code not in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.ALREADY_EXISTS,
    )


def _started_again(
    req: chat_pb2.StartConversationRequest, conv: chat_pb2.Conversation
) -> chat_pb2.Conversation:
    """A start of an existing conversation_id: its retry gets the conversation; a start for another
    customer or channel is ALREADY_EXISTS (it was handed someone else's conversation). What the
    hot view does not know (yet) is not compared."""
    if (conv.customer_id and conv.customer_id != req.customer_id) or (
        conv.channel and conv.channel != req.channel
    ):
        raise v.RequestRejected(
            grpc.StatusCode.ALREADY_EXISTS,
            f"conversation {req.conversation_id!r} already exists for another customer or channel "
            f"(customer_id {conv.customer_id!r}, channel {_channel_name(conv.channel)}): "
            "a retry of its start sends the same ones; a new conversation needs a new conversation_id",
        )
    return conv


def _channel_name(channel: int) -> str:
    try:
        return events_pb2.Channel.Name(channel)
    except ValueError:  # a channel a newer ingress knows
        return str(channel)


def _reused(earlier: Ack, digest: str) -> bool:
    """A client_message_id already written with another text (`digest`: hv.claim_digest of this
    one's); a claim without a digest, recorded before digests were, compares as the same."""
    return bool(earlier.digest) and earlier.digest != digest


@dataclass(frozen=True)
class _ReusedKey(v.RequestRejected):
    """ALREADY_EXISTS, with the ack recorded for the key (a repeat in the batch is compared with it)."""

    earlier: Ack | None = field(default=None, kw_only=True)


def _reused_key(client_message_id: str, earlier: Ack) -> v.RequestRejected:
    return _ReusedKey(
        grpc.StatusCode.ALREADY_EXISTS,
        f"client_message_id {client_message_id!r} was already used in this conversation for a "
        f"different text (event {earlier.event_id}): a retry sends the same text; a new message "
        "needs a new client_message_id",
        earlier=earlier,
    )


def _resolve_followers(
    followers: list[tuple[int, int]],
    outcomes: list[Outcome | None],
    requests: Sequence[chat_pb2.SendMessageRequest | v.MalformedRequest],
) -> None:
    """A repeat of a key in the same batch gets its first occurrence's outcome (duplicate=true),
    or ALREADY_EXISTS when the first was written and its text is another."""
    for i, first in followers:
        outcome = outcomes[first]
        repeat, original = requests[i], requests[first]
        assert isinstance(repeat, chat_pb2.SendMessageRequest)
        assert isinstance(original, chat_pb2.SendMessageRequest)
        if isinstance(outcome, _ReusedKey) and outcome.earlier is not None:
            # The first was refused for its text; the repeat may be the genuine retry.
            earlier = outcome.earlier
            outcomes[i] = (
                _reused_key(repeat.client_message_id, earlier)
                if _reused(earlier, hv.claim_digest(repeat.text))
                else ack_response(repeat, earlier, duplicate=True)
            )
        elif isinstance(outcome, chat_pb2.SendMessageResponse) and repeat.text != original.text:
            # (Had the first failed, the repeat shares its failure: a retry finds out.)
            ack = Ack(outcome.event_id, outcome.partition, outcome.offset)
            outcomes[i] = _reused_key(repeat.client_message_id, ack)
        elif isinstance(outcome, chat_pb2.SendMessageResponse):
            follower = chat_pb2.SendMessageResponse()
            follower.CopyFrom(outcome)
            follower.duplicate = True
            outcomes[i] = follower
        else:
            outcomes[i] = outcome


def ack_response(
    req: chat_pb2.SendMessageRequest | agent_pb2.SendAgentMessageRequest, ack: Ack, duplicate: bool
) -> chat_pb2.SendMessageResponse:
    return chat_pb2.SendMessageResponse(
        event_id=ack.event_id,
        partition=ack.partition,
        offset=ack.offset,
        duplicate=duplicate,
        client_message_id=req.client_message_id,
        conversation_id=req.conversation_id,
    )


def _is_closed(reg: Registration) -> bool:
    if reg.closed_ns:
        return True
    if reg.state_json and _CLOSED_STATUS in reg.state_json:
        state = ConversationState.from_json(json.loads(reg.state_json))
        return state.status == STATUS_CLOSED
    return False


def _not_found(tenant_id: str, conversation_id: str) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.NOT_FOUND,
        f"conversation {conversation_id!r} of tenant {tenant_id!r} does not exist "
        "(start it with StartConversation)",
    )


def _erased_conversation(conversation_id: str) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"conversation {conversation_id!r} was erased (switchboard tenant erase): it takes no more "
        "writes and cannot be started again; start a new conversation",
    )


def _closed(conversation_id: str) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"conversation {conversation_id!r} is closed; start a new conversation",
    )


def _lease_stale() -> Unavailable:
    return unavailable(
        "this ingress process could not renew its lease in Redis lately; retry (another process, "
        "or this one once Redis answers it again)"
    )


def _being_closed(conversation_id: str) -> v.RequestRejected:
    return unavailable(f"conversation {conversation_id!r} is being closed; retry to learn the outcome")


def _after_failure(req: chat_pb2.SendMessageRequest) -> v.RequestRejected:
    return v.RequestRejected(
        grpc.StatusCode.ABORTED,
        f"not written: an earlier message of conversation {req.conversation_id!r} in this stream "
        "failed (or its outcome is not known yet); resend from that one to keep the order",
    )


def _incident(method: str, what: str) -> v.RequestRejected:
    incident = uuid.uuid4().hex[:12]
    log.exception("%s failed %s (incident %s)", method, what, incident)
    return v.RequestRejected(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the ingress log)"
    )


def _uuid7_ns(event_id: str) -> int:
    """The creation time in a UUIDv7 event id (its first 48 bits are Unix milliseconds)."""
    try:
        return int(uuid.UUID(event_id).hex[:12], 16) * 1_000_000
    except ValueError:
        return time.time_ns()


async def _retrying(step: Callable[[], Awaitable[object]], what: str, attempts: int = 60) -> None:
    for attempt in range(attempts):
        try:
            await step()
            return
        except Exception as exc:
            if attempt == attempts - 1:
                log.error("gave up %s after %d attempts: %r", what, attempts, exc)
                raise
            await asyncio.sleep(min(0.2 * 2**attempt, 10.0))
