"""The delivery contract every Switchboard processor runs on: a plain aiokafka consumer.

Why not Faust's consumer: around start-up, recovery and rebalances it dropped records it had
fetched, left a partition idle with records waiting, and acked a batch also when its agent was
cancelled (faust-streaming #216, #221, #502; seen here as lost events and a partition that
stalled for minutes). The shape below is the one getsentry/arroyo uses:

- records of a partition are handed to the processor in offset order, in batches;
- an offset is committed only after `process` returned, i.e. after what it produced is durable;
- a failure that looks like an outage (Kafka, Redis, ClickHouse unreachable) is retried with
  backoff, forever, and nothing is committed meanwhile;
- any other failure is retried a few times, then the batch is split in halves until the record
  that fails every time is found; that record goes to the dead-letter topic with the error, the
  processor, partition and offset in its headers, and the partition moves on;
- a revocation waits for the batch in hand, so two members never apply one partition at once;
- stopping (SIGTERM) finishes the batch in hand; a stop during an outage exits without
  committing, and the batch is delivered again on the next start. No wait on Kafka holds a stop
  up: a poll, a start, a commit or a dead letter still under way is abandoned (a request already
  sent gets STOP_GRACE_S), and the clients' own stops are bounded (CLOSE_BOUND_S);
- a Kafka client that stopped fetching with records waiting is started again (`_stalled`).

Processors are idempotent (they remember what they applied per partition/conversation), so a
batch applied again after a crash or a rebalance changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from services import eventloop
from services.kafka_clients import started
from services.observability import metrics
from services.outages import is_outage
from services.settings import Settings

log = logging.getLogger(__name__)

# Attempts before a failure that does not look like an outage is treated as a poison record.
POISON_ATTEMPTS = 3
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
# The pause after a failed poll, or a batch failed by an outage: at most 1 s. Crash rehearsals
# saw the sessions worker still asleep 3.2 s after the outage had ended, with RETRY_MAX_S: after a
# Kafka restart (its coordinator answers GroupLoadInProgress for seconds) past its group's sync,
# and after a Redis restart (BusyLoadingError while it loads its file) past the load: the hot view
# that much later. A try a second against a store that is down is not a spin (aiokafka's metadata
# retries are throttled apart, services.kafka_clients).
OUTAGE_RETRY_MAX_S = 1.0
# The stall watchdog (`BatchConsumer._stalled`): while polls return nothing, every this often it
# asks whether an assigned partition has records past the consumer's position; a consumer that
# returned none for STALL_BOUND_S although there were some is started again.
STALL_CHECK_EVERY_S = 5.0
STALL_BOUND_S = 30.0
# Bound on each of the watchdog's requests: a Kafka that does not answer is an outage (the client
# reconnects by itself), never a reason to start the consumer again.
STALL_REQUEST_BOUND_S = 5.0
# A group join that has not completed for this long is logged as an error (again after as long
# again) and shows in switchboard_consumer_joining_seconds. Starting the consumer again does not
# help: seen in a soak, Kafka 4.1's group coordinator was left refusing every join of one group
# (NOT_COORDINATOR) after an unclean broker restart, until the broker was restarted.
JOIN_BOUND_S = 60.0
# One attempt to dead-letter a record; past it the attempt fails and the next one goes through a
# new producer (a healthy Kafka answers in milliseconds).
DEAD_LETTER_ATTEMPT_S = 15.0
# The source positions (topic, partition, offset) this consumer dead-lettered most recently: a batch
# applied again (after a failed deferred write, a restart from the last commit) finds its rejects
# again and sends none of them twice. A process killed between a dead letter and its commit still
# sends it again after its restart: `sb-dlq-source` names the record either way.
DEAD_LETTERED_REMEMBERED = 4096
# After a stop: how long a commit or a dead letter already under way may still take before it is
# abandoned (a healthy Kafka answers in milliseconds; a Kafka that is down never does, and the
# batch is then applied again after the restart, as after a crash).
STOP_GRACE_S = 2.0
# A commit not completed by then restarts the consumer (its batch is applied again). Seen: an
# aiokafka client's commit wedged behind its coordinator lookup after a broker's kill, and the
# processor applied nothing meanwhile (the sessions fold stood 34 s at 30 s in the eleventh
# session's soak). The cause, found in the twelfth: the client's metadata task had ended on
# uvloop's closed-transport RuntimeError (services/kafka_clients.py now makes that write a
# connection error); this bound stays as the backstop for what else may wedge a client. A
# healthy commit waits only for Kafka to be back: ~3 s after a kill -9 under `switchboard run`,
# ~7 s for a leader's loss on 3 brokers, up to ~11.6 s seen on a slower VM; a restart when Kafka
# is away longer costs a rejoin and the batch applied again (idempotent).
COMMIT_BOUND_S = 12.0
# The same bound on a processor's own requests through PartitionControl (committed, end offsets).
CONTROL_BOUND_S = 30.0
# Each Kafka client's own stop at `close()`: with the broker gone or hung, aiokafka's consumer
# waits on its group coordination (and a dynamic member's LeaveGroup) for up to its request
# timeout, 40 s, and gains nothing by it: close() commits nothing, and a dead letter the producer
# still holds was not counted as sent (it is sent again after the restart). A healthy Kafka lets
# both stop in milliseconds.
CLOSE_BOUND_S = 3.0
# How long a wait abandoned at a stop may take to unwind once cancelled.
CANCEL_BOUND_S = 1.0

T = TypeVar("T")


class _Stopped(BaseException):
    """The process is stopping and a wait on Kafka was abandoned: the batch in hand is not
    committed. A BaseException, like a cancellation, so that no processor's or retry loop's
    `except Exception` takes it for a failure of the batch."""


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as processors see it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


Rejected = Sequence[tuple[Record, BaseException]]


class Processor(Protocol):
    name: str

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        """Partitions were assigned; seek where this processor's own bookkeeping says."""

    async def on_revoked(self, partitions: set[int]) -> None:
        """Partitions were taken away (the batch in hand is finished by then)."""

    async def process(self, records: Sequence[Record]) -> Rejected:
        """Apply the records (in offset order per partition); return once the result is durable,
        or once it is under way and `pending_write` hands over what to await (optional).

        Records a pure step refused (undecodable, a fold or row builder that raised) are returned
        with their error, to be dead-lettered; everything else must be applied.

        A processor may also have `pending_write() -> Awaitable | None`, asked right after each
        `process` that the consumer will commit: the batch's write still under way (the
        projector's insert, while the next batch's rows are built). The commit waits for it; if
        it fails, nothing is committed and the consumer starts again from its last commit."""

    async def idle(self, consumer: PartitionControl) -> None:
        """Called when a poll returned nothing: a place for periodic checks."""

    async def healthy(self) -> bool:
        """Whether the sinks work (asked before a lone failing record is dead-lettered)."""


class PartitionControl(Protocol):
    def seek(self, partition: int, offset: int) -> None: ...

    async def seek_to_beginning(self, partition: int) -> None: ...

    async def committed(self, partition: int) -> int | None: ...

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]: ...

    def assigned(self) -> set[int]: ...


def raise_if_cancelling(exc: Exception) -> None:
    """For a loop that survives errors: a client library turned our cancellation into its own
    error (aiokafka and redis-py do, mid-request), so stop, as asked, instead of going on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


@dataclass
class ConsumerStats:
    batches: int = 0
    records: int = 0
    dead_lettered: int = 0
    failures: int = 0
    # Per partition: the next offset to apply, and the log end seen at the last poll.
    position: dict[int, int] = field(default_factory=dict)
    last_poll_monotonic: float = 0.0
    # Times the Kafka consumer was started again: the stall watchdog, a commit not completed
    # within COMMIT_BOUND_S, or a write that failed after its batch was processed.
    restarts: int = 0
    # Since when (monotonic) the consumer has been joining its group without an assignment.
    joining_since: float | None = None


class _Control:
    def __init__(self, consumer: AIOKafkaConsumer, topic: str) -> None:
        self._consumer = consumer
        self._topic = topic

    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self._topic, partition)

    def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(self._tp(partition), offset)

    async def seek_to_beginning(self, partition: int) -> None:
        await self._consumer.seek_to_beginning(self._tp(partition))

    # Bounded (CONTROL_BOUND_S): processors call these in rebalance callbacks, where a client
    # wedged on a request would hold the assignment, silently, for good; a TimeoutError is logged
    # and retried by the caller like any Kafka error.
    async def committed(self, partition: int) -> int | None:
        offset = await asyncio.wait_for(self._consumer.committed(self._tp(partition)), CONTROL_BOUND_S)
        return None if offset is None or offset < 0 else int(offset)

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        ends = await asyncio.wait_for(
            self._consumer.end_offsets([self._tp(p) for p in partitions]), CONTROL_BOUND_S
        )
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    def assigned(self) -> set[int]:
        return {tp.partition for tp in self._consumer.assignment() if tp.topic == self._topic}


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runner: BatchConsumer) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._runner._revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._runner._assigned({tp.partition for tp in assigned})


class BatchConsumer:
    """Runs one `Processor` over one topic with the contract in this module's docstring."""

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        *,
        topic: str,
        group_id: str,
        batch_size: int,
        instance_id: str | None = None,
        linger_s: float = 0.0,
    ) -> None:
        self._settings = settings
        self._processor = processor
        # A processor whose `process` may return with its write under way (Processor.process).
        self._pending_write_of: Callable[[], Awaitable[Any] | None] | None = getattr(
            processor, "pending_write", None
        )
        self._topic = topic
        self._group_id = group_id
        self._batch_size = batch_size
        self._instance_id = instance_id
        # Batches by size and age: once a poll returned records, keep polling for up to this long
        # until the batch is full (for sinks whose every write has a fixed cost, like ClickHouse's
        # inserts). 0: process whatever one poll returned.
        self._linger_s = linger_s
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._control: _Control | None = None
        self._in_hand = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.stats = ConsumerStats()
        self._dead_lettered: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        # The stall watchdog's clocks: the last check, and since when checks have seen records
        # waiting with none returned (None: not seen, or records returned since).
        self._checked_at = time.monotonic()
        self._behind_since: float | None = None
        self._poll_delay = RETRY_INITIAL_S
        self._join_logged_at = 0.0
        # The last batch's commit, under way while the next batch is fetched and applied (see
        # `_commit_done`).
        self._committing: asyncio.Task[bool] | None = None
        # A commit that did not complete within COMMIT_BOUND_S was seen outside `_run`.
        self._commit_wedged = False
        # A commit's error that a revocation met first (raised by `_run`'s next `_commit_done`).
        self._commit_error: BaseException | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the Kafka clients, waiting (forever) for Kafka; returns early on `stop()`, and
        `run()` then returns at once."""
        if not await self._start_consumer():
            return
        assert self._producer is None
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._settings.kafka_bootstrap, acks="all", enable_idempotence=True
        )
        if not await self._until_up("Kafka (dead-letter producer)", self._producer.start):
            return
        # A processor that keeps its own position dead-letters before that position passes a
        # refused record (streams/sessions: SessionsProcessor.bind_dead_letter).
        bind = getattr(self._processor, "bind_dead_letter", None)
        if bind is not None:
            bind(self._dead_letter_all)
        metrics.observe_consumer(self)

    async def _start_consumer(self) -> bool:
        """A new Kafka consumer, started and subscribed; False when stopping first."""
        if self._stopping.is_set():
            return False
        s = self._settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=self._group_id,
            group_instance_id=self._instance_id,
            client_id=f"{self._group_id}-{socket.gethostname()}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(s.worker_session_timeout_s * 1000),
            heartbeat_interval_ms=int(max(1.0, s.worker_session_timeout_s / 5) * 1000),
            max_poll_interval_ms=600_000,
            fetch_max_wait_ms=int(s.batch_within_s * 1000),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._control = _Control(self._consumer, self._topic)
        if not await self._until_up("Kafka (consumer)", self._consumer.start):
            return False
        self._consumer.subscribe([self._topic], listener=_Rebalance(self))
        self._checked_at, self._behind_since = time.monotonic(), None
        return True

    async def _until_up(self, what: str, start: Callable[[], Awaitable[None]]) -> bool:
        """`start()` a Kafka client, again after a pause while Kafka is not reachable, forever;
        False when stopping first (the half-started client is stopped by `close()`)."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self._unless_stopping(start())
                return True
            except _Stopped:
                return False
            except Exception as exc:
                if not isinstance(exc, KafkaError) and not is_outage(exc):
                    raise
                log.warning("%s not reachable yet (%r); retrying in %.1fs", what, exc, delay)
            if not await self._pause(delay):
                return False
            delay = min(delay * 2, RETRY_MAX_S)

    async def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        """Stop the Kafka clients, each within CLOSE_BOUND_S (at once, so that a Kafka that is
        down costs the bound once): nothing is committed here, and what a client still held
        unsent or uncommitted is delivered again on the next start."""
        stops = [
            self._bounded_stop(name, client)
            for name, client in (("consumer", self._consumer), ("dead-letter producer", self._producer))
            if client is not None
        ]
        await asyncio.gather(*stops)

    async def _bounded_stop(self, name: str, client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
        # Not wait_for: it waits for the cancelled stop to unwind, and aiokafka's consumer does
        # not unwind promptly while it waits on its group coordination.
        stopping = asyncio.ensure_future(client.stop())
        done, _ = await asyncio.wait({stopping}, timeout=CLOSE_BOUND_S)
        if not done:
            stopping.cancel()
            stopping.add_done_callback(_ignore_outcome)
            log.warning(
                "%s: the Kafka %s did not stop within %.0fs (Kafka unreachable?); going on without it",
                self._processor.name,
                name,
                CLOSE_BOUND_S,
            )
        elif not stopping.cancelled() and stopping.exception() is not None:
            log.warning(
                "%s: stopping the Kafka %s failed: %r", self._processor.name, name, stopping.exception()
            )

    async def run(self) -> None:
        """Poll, process and commit until `stop()`."""
        # Apart from the polls: aiokafka's getmany waits, without bound, for the group join.
        watching = asyncio.ensure_future(self._watch_joins())
        try:
            await self._run()
            # The last batch's commit (bounded by STOP_GRACE_S once stopping), after the write it
            # waits for (a projector's insert under way: not bounded, as an insert inside
            # `process` never was).
            await self._commit_done()
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
            if self._committing is not None:
                # Cancelled: the commit goes with it (its records are applied again after a
                # restart, as for any commit that did not complete).
                self._committing.cancel()
                self._committing = None

    async def _watch_joins(self) -> None:
        while True:
            await asyncio.sleep(STALL_CHECK_EVERY_S)
            if self._consumer is not None:
                self._watch_join(self._consumer, time.monotonic())

    async def _run(self) -> None:
        if self._stopping.is_set():
            # Stopped before or while starting: the consumer may not even exist.
            return
        assert self._consumer is not None and self._control is not None
        while not self._stopping.is_set():
            fetched = await self._poll(
                timeout_ms=int(self._settings.batch_within_s * 1000) or 1, max_records=self._batch_size
            )
            self.stats.last_poll_monotonic = time.monotonic()
            records = _records(fetched)
            if records and self._linger_s > 0:
                records = await self._linger(records)
            if not records:
                if self._stopping.is_set():
                    break
                # Nothing arrived: what was applied is committed before the consumer idles.
                if not await self._commit_done():
                    await self._restart_or_stop()
                    continue
                await self._processor.idle(self._control)
                try:
                    if await self._unless_stopping(self._stalled()):
                        await self._restart_consumer()
                except _Stopped:
                    break
                continue
            self._behind_since = None
            async with self._in_hand:
                # A revocation that came in between: drop what is no longer ours.
                mine = self._control.assigned()
                records = [r for r in records if r.partition in mine]
                if not records:
                    continue
                with metrics.batch_observed(self._processor.name, records):
                    done = await self._apply(records)
                    if not done:
                        return
                # What the batch still has under way (a projector's insert), awaited by its commit.
                pending = self._pending_write()
                # The previous batch's commit has had this batch's fetch and apply to complete;
                # this batch's goes on while the next one is fetched and applied (one commit
                # under way at a time, so they land in order). Still only after `process`
                # returned: committed means applied. Started in hand, so a revocation waits
                # for it (`_revoked`).
                committed = await self._commit_done()
                if committed:
                    self._committing = asyncio.ensure_future(self._commit(records, pending))
            if not committed and not await self._restart_or_stop():
                break

    async def _restart_or_stop(self) -> bool:
        """Start the Kafka consumer again (a commit that did not complete); False when stopping."""
        try:
            await self._restart_consumer()
        except _Stopped:
            return False
        return True

    async def _commit_done(self) -> bool:
        """Wait for the commit under way, if any. False when it did not complete within
        COMMIT_BOUND_S (the caller starts the consumer again: the records since the last commit
        that did are applied again). The commit of a batch overlaps the next batch: at ~35 ms a
        batch of 500, the sessions worker waited ~7 ms of each for Kafka's answer to its commit
        (RESULTS.md, twentieth session)."""
        if self._commit_error is not None:
            # A commit that failed with an error of ours, met first by a revocation (whose
            # listener aiokafka would log and swallow it in): it ends the run here, once.
            error, self._commit_error = self._commit_error, None
            raise error
        task = self._committing
        if task is None:
            committed = True
        else:
            # Awaited from `_run` and from a revocation alike (a task may have several awaiters):
            # shielded, so an awaiter cancelled (a listener whose coordination task is cancelled)
            # does not cancel the commit under the others; forgotten once done, also when it
            # failed (every later wait would raise its error again).
            try:
                committed = await asyncio.shield(task)
            except asyncio.CancelledError:
                # Forgotten only if the commit itself was cancelled (run's end): an awaiter that
                # was cancelled leaves the outcome to the others.
                if task.cancelled() and self._committing is task:
                    self._committing = None
                raise
            except BaseException:
                if self._committing is task:
                    self._committing = None
                raise
            if self._committing is task:
                self._committing = None
        if self._commit_wedged:
            self._commit_wedged = False
            return False
        return committed

    async def _poll(self, *, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        """`getmany`, through the errors aiokafka hands up from group coordination.

        After a broker restart its coordinator may answer a SyncGroup with GroupLoadInProgress,
        which aiokafka raises from the next poll once it has asked to rejoin (seen in a soak: the
        assistant process exited on it), or hand up an outage from its connection. Nothing was
        fetched, nothing is committed: poll again after a pause (a lasting error, such as an
        authorization refused, is logged each time)."""
        assert self._consumer is not None
        try:
            # Raced with the stop: with the group coordinator gone, getmany waits for the
            # rejoin without bound (records it has not returned were not applied: none lost).
            fetched = await self._unless_stopping(
                self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
            )
            self._poll_delay = RETRY_INITIAL_S
            return fetched
        except _Stopped:
            return {}
        except Exception as exc:
            # Also an outage that is not a KafkaError: uvloop's RuntimeError for a write on a
            # connection a broker restart closed, handed up by the group coordinator (the sessions
            # worker exited on it in a soak). A bug of ours still ends the run.
            if not isinstance(exc, KafkaError) and not is_outage(exc):
                raise
            self.stats.failures += 1
            log.error(
                "%s: polling Kafka failed (%r); polling again in %.1fs",
                self._processor.name,
                exc,
                self._poll_delay,
            )
            await self._pause(self._poll_delay)
            self._poll_delay = min(self._poll_delay * 2, OUTAGE_RETRY_MAX_S)
            return {}

    async def _linger(self, records: list[Record]) -> list[Record]:
        """Add what arrives within the linger time to a batch, until it is full. Records of one
        partition stay in offset order (each poll continues where the previous one stopped)."""
        assert self._consumer is not None
        deadline = time.monotonic() + self._linger_s
        while len(records) < self._batch_size and not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            fetched = await self._poll(
                timeout_ms=max(1, int(left * 1000)), max_records=self._batch_size - len(records)
            )
            self.stats.last_poll_monotonic = time.monotonic()
            records.extend(_records(fetched))
        return records

    # --- the stall watchdog ------------------------------------------------------------------

    async def _stalled(self) -> bool:
        """Whether the Kafka consumer stopped returning records it has to return.

        aiokafka fetches in a background task, and `getmany` only reads what that task buffered: if
        the task ends (aio-libs/aiokafka#983: it swallows a cancellation and finishes without a
        word), every poll returns nothing, forever, with records waiting. So: the fetch task ended,
        or checks have seen an assigned partition with records past the position for STALL_BOUND_S
        while polls returned none. The bound runs from the first check that saw records waiting,
        not from the last records returned: after a long batch (a sink's outage retried), a slow
        group join or checks Kafka did not answer, a record that arrived a moment before the
        check is not a stall. Kafka not answering the check is an outage, not a stall (and starts
        the clock again: nothing is known of that time)."""
        now = time.monotonic()
        if now - self._checked_at < STALL_CHECK_EVERY_S:
            return False
        self._checked_at = now
        assert self._consumer is not None
        consumer = self._consumer
        ended = fetch_task_ended(consumer)
        if ended is not None:
            log.error("%s: the Kafka consumer's fetch task has ended (%r)", self._processor.name, ended)
            return True
        coordinating = _coordination_task(consumer)
        if coordinating is not None and coordinating.done():
            # It ended on an error (seen in a soak: uvloop's RuntimeError writing to a transport
            # closed by a Kafka restart); every poll raises it from now on, and nothing heartbeats.
            log.error("%s: the Kafka consumer's group coordination has ended", self._processor.name)
            return True
        syncing = metadata_task_ended(consumer)
        if syncing is not None:
            # Then no metadata update ever completes again, and the group coordination waits on
            # one holding the lock every commit needs (services/kafka_clients.py: the cause seen).
            log.error("%s: the Kafka consumer's metadata task has ended (%r)", self._processor.name, syncing)
            return True
        partitions = [tp for tp in consumer.assignment() if tp.topic == self._topic]
        if not partitions:
            self._behind_since = None
            return False
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(partitions), STALL_REQUEST_BOUND_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Kafka away or busy: an outage, and the client reconnects by itself.
            self._behind_since = None
            return False
        # At once, so that one bound covers them all however many partitions there are.
        positions = await asyncio.gather(*(_position(consumer, tp) for tp in partitions))
        behind = [
            f"{tp.partition}: at {position}, end {ends.get(tp)}"
            for tp, position in zip(partitions, positions, strict=True)
            if position < ends.get(tp, 0)
        ]
        if not behind:
            self._behind_since = None
            return False
        if self._behind_since is None:
            self._behind_since = now
        if now - self._behind_since < STALL_BOUND_S:
            return False
        log.error(
            "%s: no records returned for %.0fs while partitions have some (%s)",
            self._processor.name,
            now - self._behind_since,
            "; ".join(behind),
        )
        return True

    def _watch_join(self, consumer: AIOKafkaConsumer, now: float) -> None:
        """Note since when the group join has been under way, and say so past JOIN_BOUND_S (a
        member that is not assigned anything applies nothing, and reports no lag either)."""
        if not _joining(consumer):
            self.stats.joining_since = None
            return
        if self.stats.joining_since is None:
            self.stats.joining_since = self._join_logged_at = now
            return
        if now - self._join_logged_at >= JOIN_BOUND_S:
            self._join_logged_at = now
            log.error(
                "%s: group %s has been joining for %.0fs without an assignment: Kafka unreachable, "
                "or its group coordinator refusing the join (Kafka 4.1 can be left refusing every "
                "join of a group, NOT_COORDINATOR, after an unclean broker restart: restarting the "
                "broker clears it)",
                self._processor.name,
                self._group_id,
                now - self.stats.joining_since,
            )

    async def _restart_consumer(self) -> None:
        """Stop the Kafka consumer and start a new one with the same group and static id: its
        partitions go through revocation and assignment, as in a rebalance (the processor's own
        bookkeeping says where to resume; nothing uncommitted was committed)."""
        assert self._consumer is not None and self._control is not None
        self.stats.restarts += 1
        log.error(
            "%s: starting the Kafka consumer again (restart %d)", self._processor.name, self.stats.restarts
        )
        await self._revoked(self._control.assigned())
        old = self._consumer
        with contextlib.suppress(Exception, _Stopped):
            await self._unless_stopping(asyncio.wait_for(old.stop(), STALL_REQUEST_BOUND_S * 2))
        # Stopping: not started again (close() stops what is left of the old one).
        await self._start_consumer()
        self._commit_wedged = False

    # --- one batch ---------------------------------------------------------------------------

    async def _apply(self, records: Sequence[Record]) -> bool:
        """Process the batch; False if the process is stopping with it unfinished."""
        try:
            return await self._apply_until_done(records)
        except _Stopped:
            # Its dead letters did not reach Kafka before the stop.
            log.error(
                "%s: stopped with batch %s unfinished (Kafka unreachable); not committing it",
                self._processor.name,
                _span(records),
            )
            return False

    async def _apply_until_done(self, records: Sequence[Record]) -> bool:
        attempts = 0
        delay = RETRY_INITIAL_S
        while True:
            try:
                rejected = await self._processor.process(records)
                for record, error in rejected:
                    await self._dead_letter(record, error)
                self._count_applied(records)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failures += 1
                outage = is_outage(exc)
                if not outage:
                    attempts += 1
                    if attempts >= POISON_ATTEMPTS:
                        isolated = await self._isolate(records)
                        if isolated is not None:
                            return isolated
                        attempts = 0
                log.error(
                    "%s: batch %s failed (%s), retrying in %.1fs: %r",
                    self._processor.name,
                    _span(records),
                    "outage" if outage else f"attempt {attempts}/{POISON_ATTEMPTS}",
                    delay,
                    exc,
                )
            if not await self._pause(delay):
                log.error(
                    "%s: stopped with batch %s unfinished; not committing it",
                    self._processor.name,
                    _span(records),
                )
                return False
            delay = min(delay * 2, OUTAGE_RETRY_MAX_S if outage else RETRY_MAX_S)

    async def _isolate(self, records: Sequence[Record]) -> bool | None:
        """Find the records of a failing batch that fail on their own and dead-letter them.

        Halves are tried left before right, so what succeeds is applied in order. A record is
        dead-lettered only when the failure is its own: another part of the batch went through,
        or (a batch of one) the processor's health probe passes. When every part fails the same
        way the fault is the sink's, not the data's: returns None and the batch is retried as an
        outage. False: stopping with the batch unfinished."""
        inline_writes = getattr(self._processor, "inline_writes", None)
        if inline_writes is not None:
            # Each part's write is done when `process` returns: a part "applied" is applied.
            inline_writes()
        poison: list[tuple[Record, BaseException]] = []
        applied = 0
        dead = 0  # dead-lettered as they were found
        pending: list[Sequence[Record]] = [records]
        while pending:
            part = pending.pop(0)
            try:
                rejected = await self._processor.process(part)
                poison.extend(rejected)
                applied += len(part) - len(rejected)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_outage(exc):
                    log.error("%s: outage while isolating a failing record: %r", self._processor.name, exc)
                    return None
                if len(part) == 1:
                    # Dead-lettered now, before a later part is applied: a processor that keeps
                    # its own position (the sessions worker) would otherwise write it past this
                    # record first, and a crash in between would lose the dead letter.
                    if applied == 0 and not await self._healthy():
                        log.error(
                            "%s: record %s fails alone and the processor is not healthy; retrying "
                            "batch %s as an outage",
                            self._processor.name,
                            _span(part),
                            _span(records),
                        )
                        return None
                    await self._dead_letter(part[0], exc)
                    dead += 1
                else:
                    mid = len(part) // 2
                    pending[:0] = [part[:mid], part[mid:]]
            if self._stopping.is_set():
                return False
        if not poison:
            if dead:
                self._count_applied(records)
            return True
        if applied == 0 and not dead and not await self._healthy():
            log.error(
                "%s: every record of batch %s fails and the processor is not healthy; retrying as an outage",
                self._processor.name,
                _span(records),
            )
            return None
        for record, error in poison:
            await self._dead_letter(record, error)
        self._count_applied(records)
        return True

    async def _healthy(self) -> bool:
        try:
            return bool(await self._processor.healthy())
        except Exception as exc:
            log.error("%s: health probe failed: %r", self._processor.name, exc)
            return False

    async def _dead_letter_all(self, rejected: Rejected) -> None:
        for record, error in rejected:
            await self._dead_letter(record, error)

    async def _dead_letter(self, record: Record, exc: BaseException) -> None:
        assert self._producer is not None
        source = (record.topic, record.partition, record.offset)
        if source in self._dead_lettered:
            log.info(
                "%s: %s/%d/%d was dead-lettered already (its batch is applied again)",
                self._processor.name,
                *source,
            )
            return
        reason = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: dead-lettering %s/%d/%d: %s",
            self._processor.name,
            record.topic,
            record.partition,
            record.offset,
            reason,
        )
        headers = [
            *record.headers,
            ("sb-dlq-reason", reason.encode("utf-8", "replace")[:2000]),
            ("sb-dlq-error", type(exc).__name__.encode()),
            ("sb-dlq-processor", self._processor.name.encode()),
            ("sb-dlq-source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ("sb-dlq-topic", record.topic.encode()),
            ("sb-dlq-partition", str(record.partition).encode()),
            ("sb-dlq-offset", str(record.offset).encode()),
        ]

        async def send() -> None:
            producer = await self._dead_letter_producer()
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(
                        self._settings.dead_letter_topic, key=record.key, value=record.value, headers=headers
                    ),
                    DEAD_LETTER_ATTEMPT_S,
                )
            except Exception:
                # Timed out or failed: the next attempt goes through a new producer. Seen after a
                # broker restart: a producer whose send neither completed nor failed, for good.
                await self._drop_dead_letter_producer()
                raise

        await self._until_durable("dead-lettering", send)
        self.stats.dead_lettered += 1
        self._dead_lettered[source] = None
        if len(self._dead_lettered) > DEAD_LETTERED_REMEMBERED:
            self._dead_lettered.popitem(last=False)

    async def _dead_letter_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            self._producer = await started(
                AIOKafkaProducer(
                    bootstrap_servers=self._settings.kafka_bootstrap, acks="all", enable_idempotence=True
                )
            )
        return self._producer

    async def _drop_dead_letter_producer(self) -> None:
        broken, self._producer = self._producer, None
        if broken is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broken.stop(), STALL_REQUEST_BOUND_S * 2)

    async def _until_durable(self, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
        """`attempt()` until it succeeds, forever while running; raises `_Stopped` when a stop
        comes first (an attempt under way gets STOP_GRACE_S): the batch is then not committed,
        and what it refused is dead-lettered again after the restart."""
        delay = RETRY_INITIAL_S
        while True:
            try:
                await self._unless_stopping(attempt(), STOP_GRACE_S)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("%s: %s failed, retrying in %.1fs: %r", self._processor.name, what, delay, exc)
            if not await self._pause(delay):
                raise _Stopped
            delay = min(delay * 2, RETRY_MAX_S)

    def _count_applied(self, records: Sequence[Record], *, written: bool = False) -> None:
        """Count a batch applied: once `process` returned, or for a processor with pending writes
        once its write is done (`written`, from `_commit`), so that switchboard_events_processed
        never counts a batch whose insert is still running."""
        if written == (self._pending_write_of is not None):
            self.stats.batches += 1
            self.stats.records += len(records)

    def _pending_write(self) -> Awaitable[Any] | None:
        return None if self._pending_write_of is None else self._pending_write_of()

    async def _commit(self, records: Sequence[Record], pending: Awaitable[Any] | None = None) -> bool:
        """Commit the batch's offsets once what `process` left under way for it (`pending`) is
        done; False when that failed, or when Kafka's client did not complete the commit within
        COMMIT_BOUND_S (the caller starts the consumer again: the records since the last commit
        are applied again)."""
        if pending is not None:
            try:
                # Shielded: a commit cancelled (the run's end) leaves the write to finish.
                await asyncio.shield(pending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.failures += 1
                log.error(
                    "%s: a write of batch %s failed after it was processed (%r); not committing it, "
                    "starting the consumer again: the batch is applied again",
                    self._processor.name,
                    _span(records),
                    exc,
                )
                return False
        self._count_applied(records, written=True)
        assert self._consumer is not None
        last: dict[int, int] = {}
        for r in records:
            last[r.partition] = max(last.get(r.partition, -1), r.offset)
        offsets = {TopicPartition(self._topic, p): o + 1 for p, o in last.items()}
        for p, o in last.items():
            self.stats.position[p] = o + 1
        try:
            # A commit retries while Kafka's group coordinator is unknown, i.e. while Kafka is
            # down: a stop abandons it (after STOP_GRACE_S if already under way), and so does
            # COMMIT_BOUND_S (a client wedged on a request the killed broker never answered).
            await self._unless_stopping(
                asyncio.wait_for(self._consumer.commit(offsets), COMMIT_BOUND_S), STOP_GRACE_S
            )
        except TimeoutError:
            log.error(
                "%s: Kafka's client did not complete the commit of %s within %.0fs (wedged on a "
                "request a restarted broker never answered, or Kafka away that long); starting the "
                "consumer again: the batch is applied again",
                self._processor.name,
                offsets,
                COMMIT_BOUND_S,
            )
            return False
        except _Stopped:
            log.warning(
                "%s: stopped before Kafka confirmed the commit of %s; unless it did, the records "
                "are applied again after a restart",
                self._processor.name,
                offsets,
            )
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved on (rebalance): the next owner applies these again, idempotently.
            log.warning(
                "%s: commit of %s refused (%r); the next owner re-applies them",
                self._processor.name,
                offsets,
                exc,
            )
        except Exception as exc:
            # An outage that is not a KafkaError too (uvloop's closed-transport RuntimeError).
            if not isinstance(exc, KafkaError) and not is_outage(exc):
                raise
            log.warning(
                "%s: commit failed (%r); the records are applied again after a restart",
                self._processor.name,
                exc,
            )
        return True

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the process is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def _unless_stopping(self, work: Awaitable[T], grace_s: float = 0.0) -> T:
        """`work`'s result, unless `stop()` comes first: then `work` gets `grace_s` more to end,
        is cancelled, and `_Stopped` is raised.

        Why: aiokafka's waits on Kafka have no bound of their own that a stop could use (a poll
        waits for the group join, a start or a commit retries while the coordinator is unknown,
        for as long as Kafka is down). Abandoning one loses nothing: records a poll did not
        return were not applied, and an offset not committed makes its batch be applied again
        after the restart (processors are idempotent)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and grace_s > 0:
                await asyncio.wait({task}, timeout=grace_s)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                # Its outcome (a client's error for the cancellation) is of no interest any more.
                task.add_done_callback(_ignore_outcome)
                await asyncio.wait({task}, timeout=CANCEL_BOUND_S)
        if task.cancelled() or not task.done():
            raise _Stopped
        return task.result()

    # --- rebalances --------------------------------------------------------------------------

    async def _revoked(self, partitions: set[int]) -> None:
        if not partitions:
            return
        async with self._in_hand:
            # The last batch's commit lands before the partitions go (their next owner starts
            # from it); one that did not complete has the consumer started again by `_run`.
            try:
                if not await self._commit_done():
                    self._commit_wedged = True
            except Exception as exc:
                # Raised in `_run` instead (its next wait for a commit); the partitions go all the same.
                self._commit_error = exc
            for p in partitions:
                self.stats.position.pop(p, None)
            await self._processor.on_revoked(partitions)

    async def _assigned(self, partitions: set[int]) -> None:
        assert self._control is not None
        log.info("%s: assigned partitions %s", self._processor.name, sorted(partitions))
        await self._processor.on_assigned(partitions, self._control)


async def _position(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int:
    """The consumer's position in `tp`; -1 when it does not resolve within the bound (Kafka
    answered for the end offsets, so it should have: counted as behind)."""
    try:
        return int(await asyncio.wait_for(consumer.position(tp), STALL_REQUEST_BOUND_S))
    except asyncio.CancelledError:
        raise
    except Exception:
        return -1


def _coordination_task(consumer: AIOKafkaConsumer) -> asyncio.Future[Any] | None:
    """aiokafka's group coordination task (private); None when it is not there."""
    task = getattr(getattr(consumer, "_coordinator", None), "_coordination_task", None)
    return task if isinstance(task, asyncio.Future) else None


def _joining(consumer: AIOKafkaConsumer) -> bool:
    """Whether the consumer is (re)joining its group: subscribed, and its assignment not yet
    given. Reads aiokafka's subscription state (private); False when it is not there."""
    subscription = getattr(getattr(consumer, "_subscription", None), "subscription", None)
    return bool(getattr(subscription, "_reassignment_in_progress", False))


def fetch_task_ended(consumer: AIOKafkaConsumer) -> asyncio.Future[Any] | None:
    """aiokafka's background fetch task, if it has ended while the consumer runs (then `getmany`
    returns nothing, forever, and `position()` of a partition being reset never returns:
    aio-libs/aiokafka#983). Reads a private attribute; None when it is not there."""
    fetching = getattr(getattr(consumer, "_fetcher", None), "error_future", None)
    if isinstance(fetching, asyncio.Future) and fetching.done():
        return fetching
    return None


def metadata_task_ended(consumer: AIOKafkaConsumer) -> asyncio.Future[Any] | None:
    """aiokafka's metadata task, if it has ended while the consumer runs (`close()` cancels it and
    then drops it). Reads a private attribute; None when it is not there."""
    syncing = getattr(getattr(consumer, "_client", None), "_sync_task", None)
    if isinstance(syncing, asyncio.Future) and syncing.done():
        return syncing
    return None


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _records(fetched: dict[Any, Any]) -> list[Record]:
    return [
        Record(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp, tuple(r.headers or ()))
        for tp, batch in fetched.items()
        for r in batch
    ]


def _span(records: Sequence[Record]) -> str:
    parts: dict[int, tuple[int, int]] = {}
    for r in records:
        lo, hi = parts.get(r.partition, (r.offset, r.offset))
        parts[r.partition] = (min(lo, r.offset), max(hi, r.offset))
    return ", ".join(f"{p}:{lo}..{hi}" for p, (lo, hi) in sorted(parts.items()))


def instance_id(settings: Settings, role: str) -> str:
    return settings.worker_instance_id or f"{role}-{socket.gethostname()}"


async def run_until_signalled(consumer: BatchConsumer, *extra: Callable[[], Awaitable[None]]) -> None:
    """Start the consumer, run it until SIGTERM/SIGINT, then close it; `extra` are stop hooks."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(consumer.stop()))
    metrics.serve_metrics(consumer._settings, metrics.ROLES.get(consumer._processor.name, ""))
    await consumer.start()
    eventloop.freeze_heap()
    try:
        await consumer.run()
    finally:
        await consumer.close()
        for hook in extra:
            await hook()
