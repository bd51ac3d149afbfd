"""The erasure registry: which conversations the log still holds but nobody may see again.

`switchboard tenant erase` removes a customer (or a whole tenant) from every view and from the
archive, and records the erasure as a `CustomerErased` event on the privacy topic. Kafka keeps
the customer's old records until its retention passes, so every processor (projector, sessions,
archiver) and every replay folds the privacy topic into an `Erasures` registry and skips the
erased events; otherwise the next replay, or a processor lagging behind the erasure, would bring
the customer back.

`Erasures` is pure; `ErasureFollower` reads the topic (whole at start, then follows it) and
`publish_erasure` appends a record durably.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.events import (
    HEADER_TENANT,
    Event,
    EventDecodeError,
    decode_event,
    encode_event,
    event_headers,
)
from services.kafka_clients import started
from services.settings import Settings
from streams._consumer import Record, fetch_task_ended, raise_if_cancelling

log = logging.getLogger(__name__)

# How long the follower's fetch waits at the broker when there is nothing new: how often an idle
# follower asks, not how late it learns of an erasure. The topic has one partition, always in
# the fetch under way, and the broker answers it as soon as a record arrives (fetch.min.bytes
# 1), as services/auth/_log.py's follower of the tenants topic.
FOLLOW_FETCH_WAIT_MS = 500
FOLLOW_BOUND_S = 3.0
RETRY_MAX_S = 2.0
# How long a processor's batch waits for the registry's first read (see `ErasureFollower.start`);
# normally well under a second. Beyond it the batch fails as an outage and is retried.
START_BOUND_S = 10.0
# One-shot reads (replays, commands) are not a batch holding a partition up: they wait longer for
# a slow Kafka before they give up.
ONE_SHOT_BOUND_S = 120.0
# How long stopping the follower waits for its consumer to close.
STOP_BOUND_S = 5.0
# How long one read of the topic to its end may take before the follower gives its consumer up
# and starts a new one (aiokafka's `position()` never returns once its fetch task has ended).
CATCH_UP_BOUND_S = 30.0
# While the registry cannot be read, `start` says so at most this often: every write of an
# ingress waits for it, and one warning per write refused was a flood under load.
UNAVAILABLE_LOG_EVERY_S = 10.0


def _ns(event: Event) -> int:
    return event.occurred_at.seconds * 1_000_000_000 + event.occurred_at.nanos


@dataclass(frozen=True)
class ErasureChange:
    """What applying erasures added to an `Erasures` registry (what a follower's `on_change` is
    handed): conversations newly erased by name, and tenants newly erased whole (or up to a
    later instant than before)."""

    conversations: frozenset[tuple[str, str]] = frozenset()  # (tenant, conversation)
    tenants: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.conversations or self.tenants)

    def __or__(self, other: ErasureChange) -> ErasureChange:
        return ErasureChange(self.conversations | other.conversations, self.tenants | other.tenants)


@dataclass
class Erasures:
    """Erased conversations per tenant, and tenants erased whole up to an instant. Pure."""

    conversations: dict[str, set[str]] = field(default_factory=dict)
    # tenant -> events that occurred before this (ns since the epoch) are erased
    tenants: dict[str, int] = field(default_factory=dict)
    applied: int = 0

    def apply(self, event: Event) -> ErasureChange:
        """Fold one `CustomerErased` event (other payloads are ignored); returns what it added."""
        if event.WhichOneof("payload") != "customer_erased":
            return ErasureChange()
        erased = event.customer_erased
        tenant = event.tenant_id
        tenants: frozenset[str] = frozenset()
        if erased.whole_tenant:
            before = erased.erased_before.seconds * 1_000_000_000 + erased.erased_before.nanos
            if before > self.tenants.get(tenant, -1):
                self.tenants[tenant] = before
                tenants = frozenset((tenant,))
        conversations: frozenset[tuple[str, str]] = frozenset()
        if erased.conversation_ids:
            known = self.conversations.setdefault(tenant, set())
            conversations = frozenset((tenant, c) for c in erased.conversation_ids if c not in known)
            known.update(erased.conversation_ids)
        self.applied += 1
        return ErasureChange(conversations, tenants)

    def __bool__(self) -> bool:
        return bool(self.conversations or self.tenants)

    def conversation_erased(self, tenant: str, conversation: str) -> bool:
        """Erased by name (`tenant erase --customer`); a tenant erased whole names none."""
        return conversation in self.conversations.get(tenant, ())

    def erased(self, tenant: str, conversation: str, occurred_ns: int) -> bool:
        if self.conversation_erased(tenant, conversation):
            return True
        before = self.tenants.get(tenant)
        return before is not None and occurred_ns < before

    def keeps_event(self, event: Event) -> bool:
        return not self.erased(event.tenant_id, event.conversation_id, _ns(event))

    def keeps(self, record: Record) -> bool:
        """Whether a conversation-log record survives the erasures. Decided on the tenant header
        and the key (the conversation id) where that is enough; decoded only for a tenant erased
        whole (the event's time decides) or a record without headers. An undecodable record is
        kept for the processor to refuse as it would anyway."""
        if not self:
            return True
        tenant = next((v for k, v in record.headers if k == HEADER_TENANT), None)
        if tenant is not None:
            name = tenant.decode(errors="replace")
            if name not in self.tenants:
                erased = self.conversations.get(name)
                if erased is None:
                    return True
                if record.key is not None:
                    # The key is the conversation id (schemas.events.event_key): no decode.
                    return record.key.decode(errors="replace") not in erased
        try:
            return self.keeps_event(decode_event(record.value))
        except EventDecodeError:
            return True

    def filter(self, records: list[Record]) -> list[Record]:
        return [r for r in records if self.keeps(r)] if self else records


def erasure_event_of(record_value: bytes | None) -> Event | None:
    try:
        event = decode_event(record_value)
    except EventDecodeError:
        return None
    return event if event.WhichOneof("payload") == "customer_erased" else None


async def publish_erasure(settings: Settings, event: Event) -> tuple[int, int]:
    """Append the erasure durably (acks=all); (partition, offset)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        client_id="switchboard-erase",
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.privacy_topic,
            encode_event(event),
            # Keyed by the event id: compaction keeps every erasure (a later erasure of the same
            # customer must not replace the list of an earlier one).
            key=event.event_id.encode(),
            headers=event_headers(event),
        )
        return meta.partition, meta.offset
    finally:
        await producer.stop()


class FetchEnded(Exception):
    """The follower's Kafka consumer stopped fetching (see `fetch_task_ended`)."""


class ErasuresUnavailable(TimeoutError):
    """The registry was not read within the bound. A `TimeoutError`, so `BatchConsumer` takes it
    for an outage: the batch is retried (never committed without the erasures, never
    dead-lettered because of them)."""


class ErasureFollower:
    """An `Erasures` registry folded from the privacy topic: read whole (the catch-up), then
    followed, by one background task. A missing topic is an empty registry (looked for again
    every 0.5 s).

    `start` waits for the catch-up at most `start_timeout_s`: aiokafka's `position()` (and the
    loop that reads up to the end offsets) waits without bound while Kafka does not answer, and a
    processor awaits `start` inside a batch. The catch-up goes on in the background between calls,
    so a slow read is not begun again by each retry (which could then never finish)."""

    def __init__(
        self,
        settings: Settings,
        on_change: Callable[[ErasureChange], None] | None = None,
        *,
        start_timeout_s: float = START_BOUND_S,
    ) -> None:
        self.settings = settings
        self.erasures = Erasures()
        self.start_timeout_s = start_timeout_s
        self._on_change = on_change
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._assigned = False
        # Per partition: the offset after the last record applied. A read begun again (a new
        # consumer after a failed or bounded one) goes on from there, not from the beginning: a
        # topic that takes longer than CATCH_UP_BOUND_S to read is still read, over attempts.
        self._read_to: dict[TopicPartition, int] = {}
        self._caught_up = asyncio.Event()
        self._last_error: BaseException | None = None
        self._started_at = 0.0
        self._unavailable_logged_at: float | None = None
        self._unavailable_unlogged = 0  # callers refused since the last warning

    async def _assign(self, consumer: AIOKafkaConsumer) -> bool:
        topic = self.settings.privacy_topic
        if topic not in await consumer.topics():
            return False
        parts = consumer.partitions_for_topic(topic) or {0}
        partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        # Asked before the first fetch: one parked at the broker on an empty topic would hold up
        # the request behind it on the connection for FOLLOW_FETCH_WAIT_MS.
        ends = await consumer.end_offsets(partitions)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for tp in partitions:
            if tp in self._read_to:
                consumer.seek(tp, self._read_to[tp])
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            self._apply(await consumer.getmany(timeout_ms=500))
        self._assigned = True
        return True

    @property
    def ready(self) -> bool:
        """Whether the registry was read to the topic's end (then `start` returns at once)."""
        return self._caught_up.is_set()

    async def start(self) -> Erasures:
        """The registry read to the topic's end as of the first call; then followed. Waits at
        most `start_timeout_s` for that read, else raises `ErasuresUnavailable` (the read goes
        on: a later call waits for it again). Idempotent."""
        if self._caught_up.is_set():
            return self.erasures
        self.begin()
        # Not the task itself: a caller that gives up (the bound, a cancellation) leaves the read
        # going for the next call.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), self.start_timeout_s)
        if self._caught_up.is_set():
            return self.erasures
        why = (
            f"last error: {self._last_error!r}"
            if self._last_error
            else "no error: Kafka slow or not answering"
        )
        now = time.monotonic()
        if (
            self._unavailable_logged_at is None
            or now - self._unavailable_logged_at >= UNAVAILABLE_LOG_EVERY_S
        ):
            log.warning(
                "privacy topic %s: erasures not read within %.1fs (%s); still reading; refusing to go "
                "on without them, so that no erased customer's events are let through (%d more callers "
                "refused since the last warning)",
                self.settings.privacy_topic,
                self.start_timeout_s,
                why,
                self._unavailable_unlogged,
            )
            self._unavailable_logged_at, self._unavailable_unlogged = now, 0
        else:
            self._unavailable_unlogged += 1
        raise ErasuresUnavailable(
            f"the erasure registry (topic {self.settings.privacy_topic}) was not read within "
            f"{self.start_timeout_s:.1f}s ({why})"
        )

    def begin(self) -> None:
        """Start reading the topic in the background, without waiting (at a worker's start-up:
        its first batch then seldom waits for the read)."""
        if self._task is None or self._task.done():  # (done: only if cancelled from outside)
            self._started_at = time.monotonic()
            self._task = asyncio.ensure_future(self._run())

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FOLLOW_FETCH_WAIT_MS,
            client_id="switchboard-erasures-follower",
        )

    def _ready(self, what: str) -> None:
        if not self._caught_up.is_set():
            self._caught_up.set()
            log.info(
                "privacy topic %s: %s (%d erasures, %.1fs)",
                self.settings.privacy_topic,
                what,
                self.erasures.applied,
                time.monotonic() - self._started_at,
            )

    async def _run(self) -> None:
        """Connect, read the topic to its end, then follow it; every Kafka failure is retried."""
        consumer: AIOKafkaConsumer | None = None
        delay = 0.5
        try:
            while True:
                try:
                    if consumer is None:
                        consumer = self._consumer = await started(self._new_consumer())
                    ended = fetch_task_ended(consumer)
                    if ended is not None:
                        raise FetchEnded(f"the consumer's fetch task has ended ({ended!r})")
                    if not self._assigned:
                        if not await asyncio.wait_for(self._assign(consumer), CATCH_UP_BOUND_S):
                            self._ready("no topic yet: no erasures")
                            await asyncio.sleep(0.5)
                            continue
                        self._ready("read to its end")
                    self._apply(await consumer.getmany(timeout_ms=1000))
                    self._last_error = None
                    delay = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the client reconnects by itself; keep what we have
                    raise_if_cancelling(exc)
                    self._last_error = exc
                    if consumer is not None and (not self._assigned or isinstance(exc, FetchEnded)):
                        # A read to the end that failed, or a client that stopped fetching: start
                        # over with a new consumer (what was applied stays; applying it again is
                        # harmless).
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(consumer.stop(), STOP_BOUND_S)
                        consumer = self._consumer = None
                        self._assigned = False
                    log.warning(
                        "privacy topic: read failed (%r); erasures as of the last record apply; "
                        "retrying in %.1fs",
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    # Capped under FOLLOW_BOUND_S: `tenant erase` counts on every running
                    # processor knowing of an erasure within that bound.
                    delay = min(delay * 2, RETRY_MAX_S)
        finally:
            # Also when the event loop cancels the task at exit: no consumer left open.
            if consumer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), STOP_BOUND_S)

    def _apply(self, batches: dict[TopicPartition, list[object]]) -> None:
        change = ErasureChange()
        for tp, records in batches.items():
            if records:
                self._read_to[tp] = int(getattr(records[-1], "offset", -1)) + 1
            for msg in records:
                event = erasure_event_of(getattr(msg, "value", None))
                if event is None:
                    log.error("privacy topic: skipped offset %s: not an erasure", getattr(msg, "offset", "?"))
                    continue
                change |= self.erasures.apply(event)
        # Only what changed: a follower's user (the ingress) need not look at the whole registry.
        if change and self._on_change is not None:
            self._on_change(change)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: the task's own clean-up (the consumer's stop) is bounded too.
            await asyncio.wait({self._task}, timeout=STOP_BOUND_S + 1)
            self._task = None
        self._consumer = None
        self._assigned = False
        self._caught_up.clear()


async def load_erasures(settings: Settings) -> Erasures:
    """The registry as of now (read once; for replays and commands)."""
    follower = ErasureFollower(settings, start_timeout_s=ONE_SHOT_BOUND_S)
    try:
        return await follower.start()
    finally:
        await follower.stop()
