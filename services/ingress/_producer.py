"""The ingress's Kafka producer: idempotent, acks=all, with bounded in-flight work.

A write is acknowledged to the caller only with the RecordMetadata Kafka returned. Past the in-flight
bound callers are refused at once (RESOURCE_EXHAUSTED) instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from schemas import hotview as hv
from schemas.events import Event, encode_event, event_headers, event_key
from services.ingress._validation import RequestRejected
from services.kafka_clients import FATAL_PRODUCER_ERRORS, sender_task, started
from services.settings import Settings

log = logging.getLogger(__name__)

# gRPC trailing-metadata key telling a caller how long to wait before retrying.
RETRY_AFTER_KEY = "retry-after-ms"
# After a start of the producer failed (Kafka away), sends are refused at once for this long with
# its reason, rather than each starting a producer of its own (a connection and a metadata
# request per send: thousands a second under load, with a killed broker).
START_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class Ack:
    event_id: str
    partition: int
    offset: int
    # hv.claim_digest of a message's text ("": not a message, or a claim recorded without one).
    digest: str = ""


@dataclass(frozen=True)
class Unavailable(RequestRejected):
    """Kafka did not acknowledge in time; the caller should retry (same client_message_id).

    `late_possible`: the record was handed to the producer and may still be written later, or may
    have been written with its answer lost (its claim must not be dropped)."""

    late_possible: bool = False


def unavailable(message: str, *, late_possible: bool = False) -> Unavailable:
    return Unavailable(grpc.StatusCode.UNAVAILABLE, message, late_possible)


class EventProducer:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = settings.conversation_topic
        self._producer: AIOKafkaProducer | None = None
        # The one start under way, shared by every caller (see start).
        self._starting: asyncio.Task[None] | None = None
        self._start_failed: tuple[float, str] | None = None  # (monotonic time, reason)
        self._inflight = 0
        self._limit = settings.max_inflight_produce
        self._replacing: asyncio.Task[None] | None = None
        # Bumped by each `_replace_producer`: records enqueued under different generations went to
        # different producers, so nothing orders them (see WriteOrder.stopped).
        self._generation = 0
        # Kafka key (conversation id) -> partition, as the default partitioner computes it (murmur2
        # is pure Python in aiokafka: worth computing once per conversation). The topic's partition
        # count is fixed once created (the key -> partition map depends on it).
        self._partitions: dict[bytes, int] = {}
        self._offsets_reader: AIOKafkaConsumer | None = None  # see end_offset
        self._offsets_lock = asyncio.Lock()
        # Set by `stop`: nothing is handed to Kafka after it (a write still running in a stopping
        # ingress would otherwise start a new producer after the process's lease ended).
        self._stopped = False
        # Why the producer's sender task ended (see _sender_ended); set once, never cleared: the
        # process stops (IngressServer.failed) and leaves what it held to the dead-process path.
        self._sender_failure: BaseException | None = None
        self._sender_failed = asyncio.Event()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def generation(self) -> int:
        """Which producer the next `enqueue` hands its record to (read it right before the call:
        an enqueue binds its producer before its first suspension, and a replacement bumps this
        before any later enqueue can start the new producer)."""
        return self._generation

    async def start(self) -> None:
        """Start the Kafka producer (at the ingress's start, and again after `_replace_producer`).

        One attempt at a time, shared by every caller: a caller that stops waiting (its deadline)
        leaves it going for the others, so a Kafka that does not answer costs one bootstrap, not
        one per send. After a failed attempt, callers are refused for START_RETRY_S without
        another."""
        if self._producer is not None:
            return
        starting = self._starting
        if starting is None or starting.done():
            failed = self._start_failed
            if failed is not None and time.monotonic() - failed[0] < START_RETRY_S:
                raise unavailable(failed[1])
            starting = self._starting = asyncio.ensure_future(self._start())
            # Retrieved here, so a failure nobody waited for is not reported as never retrieved.
            starting.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            await asyncio.shield(starting)
        except Unavailable as exc:
            raise unavailable(exc.message) from None  # an exception of its own per caller
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if starting.cancelled() and task is not None and not task.cancelling():
                raise unavailable("the ingress is stopping; retry") from None  # (stop)
            raise

    async def _start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap,
            client_id="switchboard-ingress",
            enable_idempotence=True,
            acks="all",
            linger_ms=self._settings.producer_linger_ms,
            max_batch_size=256 * 1024,
            # Also the age at which aiokafka fails a batch still in its buffer, which it does only
            # while the partition has no leader in the metadata (a batch once sent is retried until
            # it lands: idempotence). A later batch of the partition could then land ahead of a
            # failed one only if it was enqueued before that failure and the broker takes its
            # sequence gap (it has no state of this producer id on the partition yet); otherwise it
            # fails too (OutOfOrderSequenceNumber). WriteOrder.stopped refuses what comes after.
            request_timeout_ms=int(self._settings.produce_timeout_s * 1000) + 20_000,
            retry_backoff_ms=100,
            metadata_max_age_ms=60_000,
        )
        try:
            await producer.start()
        except BaseException as exc:  # also cancelled (by stop): no half-started client left open
            with contextlib.suppress(Exception):
                await producer.stop()
            if not isinstance(exc, KafkaError):
                raise
            reason = f"Kafka at {self._settings.kafka_bootstrap} is not reachable: {exc}; retry"
            self._start_failed = (time.monotonic(), reason)
            raise unavailable(reason) from exc
        self._producer = producer
        self._start_failed = None
        sending = sender_task(producer)
        if sending is not None:
            sending.add_done_callback(self._sender_ended)

    def _sender_ended(self, task: asyncio.Future[None]) -> None:
        """aiokafka's sender task ended while its producer was in use. It does so only on an error
        it did not expect (it logs "Unexpected error in sender routine"), and then fails every batch
        it held with that error, batches whose produce request Kafka may already have written among
        them; every later send fails at once. So this producer is done, and the outcome of every
        record failed from now on is unknown (wait_acks): the process must stop and leave those
        claims to the dead-process take-over, which answers a retry from the log. Also while the
        producer stops (its flush) or after it was replaced (its close flushes what it held):
        either way records it held may have been written. A close ends the task without an
        exception (aiokafka's routine returns on its cancel) and fails nothing."""
        if task.cancelled() or (failure := task.exception()) is None:
            return
        if self._sender_failure is None:
            self._sender_failure = failure
            log.error(
                "the Kafka producer's sender task ended (%r): the outcome of the records it held is "
                "unknown; this process stops writing and exits so that a fresh one takes over",
                failure,
            )
            self._sender_failed.set()

    async def failed(self) -> BaseException:
        """Returns (only) once the producer's sender task ended: the process must stop."""
        await self._sender_failed.wait()
        assert self._sender_failure is not None
        return self._sender_failure

    async def stop(self) -> None:
        self._stopped = True
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        reader, self._offsets_reader = self._offsets_reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.stop()

    def partition_of(self, conversation_id: str) -> int | None:
        """The partition of the conversation topic a conversation's records go to; None while the
        topic's metadata is not known (the producer has not written yet)."""
        key = conversation_id.encode()
        known = self._partitions.get(key)
        if known is not None:
            return known
        return self._partition_of(key) if self._producer is not None else None

    async def partition_for(self, conversation_id: str, within_s: float) -> int:
        """partition_of, asking Kafka for the topic's metadata when it is not known yet (a process
        that has not written since it started). Raises UNAVAILABLE past `within_s`."""
        known = self.partition_of(conversation_id)
        if known is not None:
            return known
        if self._stopped:
            raise unavailable("this ingress process is stopping; retry")
        try:
            async with asyncio.timeout(within_s):
                await self.start()
                if self._producer is not None:
                    await self._producer.partitions_for(self._topic)
        except (TimeoutError, KafkaError) as exc:
            raise unavailable(f"Kafka did not give the topic's partitions within {within_s:.0f}s") from exc
        known = self.partition_of(conversation_id)
        if known is None:
            raise unavailable("the topic's partitions are not known yet; retry")
        return known

    async def end_offset(self, partition: int, within_s: float) -> int:
        """The log end offset of a partition of the conversation topic, asked of Kafka now (for
        the rare takeover of a dead process's claim: a consumer without a group, made on first
        use). Raises UNAVAILABLE when Kafka does not answer within `within_s`."""
        if self._stopped:
            raise unavailable("this ingress process is stopping; retry")
        try:
            async with asyncio.timeout(within_s):
                # One reader, however many callers ask at once (each used to start its own).
                async with self._offsets_lock:
                    if self._offsets_reader is None:
                        self._offsets_reader = await started(
                            AIOKafkaConsumer(
                                bootstrap_servers=self._settings.kafka_bootstrap, enable_auto_commit=False
                            )
                        )
                    reader = self._offsets_reader
                if self._stopped:  # stopped while it started: `stop` did not see it
                    await reader.stop()
                    raise unavailable("this ingress process is stopping; retry")
                tp = TopicPartition(self._topic, partition)
                return int((await reader.end_offsets([tp]))[tp])
        except (TimeoutError, KafkaError) as exc:
            raise unavailable(f"Kafka did not say where partition {partition} ends ({exc!r}); retry") from exc

    def reserve(self, count: int = 1) -> None:
        """Claim in-flight slots or refuse at once; pair with `release`."""
        granted = self.reserve_up_to(count)
        if granted < count:
            self.release(granted)
            raise self.exhausted()

    def reserve_up_to(self, count: int) -> int:
        """Claim as many of `count` slots as are free (possibly none); pair with `release`."""
        granted = max(0, min(count, self._limit - self._inflight))
        self._inflight += granted
        return granted

    def exhausted(self) -> RequestRejected:
        return RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"ingress is at its in-flight limit ({self._limit} writes awaiting Kafka); retry with backoff",
        )

    def release(self, count: int = 1) -> None:
        self._inflight -= count

    async def enqueue(self, event: Event, *, bounded: bool = True) -> asyncio.Future[object]:
        """Hand the event to the producer (this fixes its order in the partition); returns the
        delivery future. Records enqueued one after another are written in that order.

        `bounded=False`: the caller bounds the wait for buffer space itself (one deadline for a
        whole batch instead of a timer per record)."""
        timeout = self._settings.produce_timeout_s
        if self._stopped:
            raise unavailable("this ingress process is stopping; retry (another process takes it)")
        if self._sender_failure is not None:
            raise unavailable("this ingress process's Kafka producer failed and it is stopping; retry")
        if self._producer is None:
            if bounded:
                try:
                    async with asyncio.timeout(timeout):
                        await self.start()
                except TimeoutError as exc:
                    raise unavailable(
                        f"Kafka did not answer the producer's start within {timeout:.0f}s; retry"
                    ) from exc
            else:
                await self.start()
        if self._producer is None:  # replaced again meanwhile (see _replace_producer)
            raise unavailable("the Kafka producer is being replaced; retry")
        key = event_key(event)
        partition = self._partitions.get(key)
        if partition is None:
            partition = self._partition_of(key)
        try:
            if not bounded:
                return await self._producer.send(
                    self._topic,
                    encode_event(event),
                    key=key,
                    partition=partition,
                    headers=event_headers(event),
                )
            async with asyncio.timeout(timeout):
                return await self._producer.send(
                    self._topic,
                    encode_event(event),
                    key=key,
                    partition=partition,
                    headers=event_headers(event),
                )
        except (TimeoutError, KafkaError) as exc:
            raise unavailable(
                f"Kafka did not accept the event within {timeout:.0f}s ({exc!r}); retry"
            ) from exc

    def _partition_of(self, key: bytes) -> int | None:
        """Kafka's default partitioner (murmur2 of the key), remembered; None (the producer then
        decides) while the topic's metadata is not known yet."""
        assert self._producer is not None
        known = self._producer.client.cluster.partitions_for_topic(self._topic)
        if not known:
            return None
        partitions = sorted(known)
        partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        if len(self._partitions) >= 100_000:
            self._partitions.clear()  # bounded; recomputed on demand
        self._partitions[key] = partition
        return partition

    def _replace_producer(self, cause: KafkaError) -> None:
        """Swap in a fresh producer (the next enqueue starts it); the broken one is closed aside."""
        if self._producer is None or (self._replacing is not None and not self._replacing.done()):
            return
        log.warning("replacing the Kafka producer after %r (its sequence state is broken)", cause)
        broken, self._producer = self._producer, None
        self._generation += 1
        self._replacing = asyncio.ensure_future(self._close_quietly(broken))

    @staticmethod
    async def _close_quietly(producer: AIOKafkaProducer) -> None:
        try:
            await asyncio.wait_for(producer.stop(), timeout=10)
        except Exception as exc:
            log.warning("closing the replaced producer: %r", exc)

    async def wait_acks(
        self,
        events: Sequence[Event],
        deliveries: Sequence[asyncio.Future[object]],
        on_late_ack: Sequence[Callable[[Ack | None], Awaitable[None]] | None],
    ) -> list[Ack | Unavailable]:
        """Kafka's acks for enqueued records, in order, waiting at most the produce timeout with
        one timer for the whole batch. A record still unacknowledged then gets UNAVAILABLE, but it
        may still land: its `on_late_ack` callback (if any) learns the outcome later."""
        timeout = self._settings.produce_timeout_s
        pending = {d for d in deliveries if not d.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        outcomes: list[Ack | Unavailable] = []
        for event, delivery, late in zip(events, deliveries, on_late_ack, strict=True):
            if delivery in pending:
                if late is not None:
                    delivery.add_done_callback(
                        functools.partial(_report_late, event_id=event.event_id, callback=late)
                    )
                outcomes.append(
                    unavailable(
                        f"Kafka did not acknowledge within {timeout:.0f}s; the write may still land — "
                        "retry with the same client_message_id",
                        late_possible=late is not None,
                    )
                )
                continue
            exc = delivery.exception()
            if exc is not None and self._sender_failure is not None:
                # Failed by the sender's end (see _sender_ended): maybe written, maybe not.
                outcomes.append(
                    unavailable(
                        f"Kafka's answer to this write was lost ({exc!r}); it may have been written — "
                        "retry the same request (a retry with the same client_message_id, or "
                        "conversation_id for a start, is answered from the log)",
                        late_possible=True,
                    )
                )
                continue
            if exc is not None:
                if isinstance(exc, FATAL_PRODUCER_ERRORS):
                    self._replace_producer(exc)
                outcomes.append(unavailable(f"Kafka refused the event: {exc!r}; retry"))
                continue
            meta: Any = delivery.result()
            outcomes.append(Ack(event.event_id, meta.partition, meta.offset, hv.event_claim_digest(event)))
        return outcomes


_late_tasks: set[asyncio.Future[None]] = set()


def _report_late(
    fut: asyncio.Future[object], *, event_id: str, callback: Callable[[Ack | None], Awaitable[None]]
) -> None:
    ack: Ack | None = None
    if not fut.cancelled() and fut.exception() is None:
        meta = fut.result()
        ack = Ack(event_id, meta.partition, meta.offset)  # type: ignore[attr-defined]
    task = asyncio.ensure_future(callback(ack))
    _late_tasks.add(task)
    task.add_done_callback(_late_tasks.discard)
