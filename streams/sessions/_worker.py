"""The sessions worker: folds conversation events into conversation state, kept in Redis.

Redis holds the hot view: per conversation a hash with the state (JSON of `ConversationState`)
and a live stream; per client message its idempotency claim. The worker keeps its own position
next to them (`hv.APPLIED_KEY`: partition -> next offset), written once the states of a batch are
applied (a round trip of its own), so a Redis that kept the position kept everything before it.

Per batch, in this order: check the positions; take the states of the batch's conversations from
the worker's table (the states it wrote last, kept in memory) or, for the others, from Redis;
fold every event (in place, see `Fold`); write live-stream entries, claims and each changed state
once (`APPLY_SCRIPT`, one EVAL per few hundred writes, each sent on one connection as soon as
it is full and the one before it was applied, so Redis applies it while the rest is folded and a
failed batch leaves a prefix of its writes; each state after its queue writes); then the
positions, in a second round trip; then the consumer commits the offsets to Kafka (while it
fetches and applies the next batch). Every step is
idempotent: the fold skips what a state already has, a live-stream entry id comes from the offset
(Redis refuses it twice), claims and states are overwritten with the same values. The table is
only a cache of what Redis has: a batch's states go back into it once the batch is in Redis, and
a partition's states leave it when the partition is revoked, rebuilt, or its position in Redis is
not the one this worker wrote.

Redis losing data is noticed by the position: a partition the worker has written a position for
whose position is gone is rebuilt from the start of the log (states, live streams and claims),
and `hv.READY_KEY` (which the ingress requires before it accepts writes) is set for a partition
only once the rebuild reached the log end seen when it began. That target is kept in Redis
(`hv.REBUILDING_KEY`) until then, so a worker that takes the partition over mid-rebuild (a
restart, a kill -9, a rebalance) continues the rebuild instead of opening the gate. An empty
partition has a position (0) too, so its READY entry comes back after a loss. A position behind
the one the worker wrote (Redis went back to an earlier point) is applied again from there, the
partition not ready until it is back where it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from schemas import hotview as hv
from schemas.events import Event, EventDecodeError, LogPosition, decode_event, event_type
from services.settings import Settings
from streams._consumer import (
    BatchConsumer,
    PartitionControl,
    Record,
    Rejected,
    instance_id,
    is_outage,
    raise_if_cancelling,
    run_until_signalled,
)
from streams.privacy.erasures import ErasureFollower
from streams.sessions._state import STATUS_CLOSED, Fold

log = logging.getLogger(__name__)

# How often an idle worker checks that Redis still has its positions (a Redis that restarted
# empty with no traffic arriving is noticed within this).
IDLE_CHECK_S = 1.0
# States the worker keeps in memory between batches (its table), least recently used dropped
# first: a batch then reads from Redis only the conversations it has not seen lately. Measured
# (tracemalloc, with its key): ~1.1 KB per conversation with 10 messages, ~1.5 KB with a full
# dedup window of 64 UUID client message ids (their digests), so at most ~16 MB. It was ~13 KB
# with a full window while the window held the ids themselves, raw and JSON-encoded.
TABLE_CONVERSATIONS = 10_000


@dataclass
class _Rebuild:
    # The log end when the rebuild began: the partition is ready once applied up to it.
    until: int


class SessionsProcessor:
    name = "sessions"

    def __init__(
        self, settings: Settings, redis: aioredis.Redis, erasures: ErasureFollower | None = None
    ) -> None:
        self._settings = settings
        self._redis = redis
        # Erased customers' events still in the log are not folded (streams/privacy/erasures.py).
        self._erasures = erasures
        self._ttl_ms = settings.idempotency_ttl_s * 1000
        # Partitions this worker owns, with the position it last wrote (None: not yet).
        self._owned: dict[int, int | None] = {}
        self._rebuilding: dict[int, _Rebuild] = {}
        self._control: PartitionControl | None = None
        self._last_idle_check = 0.0
        self.rebuilds = 0
        # Conversation -> its state as last written to Redis, for partitions this worker owns.
        self._table: dict[tuple[str, str], Fold] = {}
        self._table_max = TABLE_CONVERSATIONS
        self.table_misses = 0
        self._set_positions = redis.register_script(POSITIONS_SCRIPT)
        # Dead-letters refused records durably (the BatchConsumer's, see bind_dead_letter).
        self._dead_letter_first: Callable[[Rejected], Awaitable[None]] | None = None

    def bind_dead_letter(self, dead_letter: Callable[[Rejected], Awaitable[None]]) -> None:
        """How to dead-letter refused records durably. This worker resumes from its own position
        in Redis, not from Kafka's committed offsets: a record refused in a batch is dead-lettered
        before the position that passes it is written (the consumer would only do so after
        `process` returned, and a crash in between lost the dead letter)."""
        self._dead_letter_first = dead_letter

    def begin(self) -> None:
        """Begin reading the erasure registry (at the worker's start-up), without waiting."""
        if self._erasures is not None:
            self._erasures.begin()

    async def close(self) -> None:
        if self._erasures is not None:
            await self._erasures.stop()

    # --- assignment ----------------------------------------------------------------------------

    async def on_assigned(self, partitions: set[int], consumer: PartitionControl) -> None:
        self._control = consumer
        delay = 0.2
        while True:
            try:
                return await self._take(partitions, consumer)
            except Exception as exc:
                # Every error, not only outages (a Redis error reply such as MISCONF or OOM too):
                # aiokafka runs this as a rebalance listener and only logs what it raises, so the
                # partitions would be folded with no rebuild and their write gate never opened.
                raise_if_cancelling(exc)
                log.error("taking partitions %s: %r; retrying in %.1fs", sorted(partitions), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _take(self, partitions: set[int], consumer: PartitionControl) -> None:
        if not partitions:
            return
        self._forget(partitions)
        positions = await self._positions(partitions)
        targets = await self._targets(partitions)
        ends = await consumer.end_offsets(partitions)
        ready: list[int] = []
        for p in sorted(partitions):
            position = positions.get(p)
            if position is None:
                await self._start_rebuild(p, ends.get(p, 0), consumer, why="Redis has no position for it")
            elif await self._resume(p, position, targets.get(p), consumer):
                ready.append(p)
        await self._mark_ready(ready)

    async def _resume(
        self, partition: int, position: int, target: int | None, consumer: PartitionControl
    ) -> bool:
        """Continue a partition from the position Redis has. A rebuild target below which the
        position still is means a rebuild was under way (a restart or a rebalance in the middle
        of it): it goes on, and the partition stays not ready until the position reaches the
        target. True if the partition is ready."""
        consumer.seek(partition, position)
        self._owned[partition] = position
        if target is not None and position < target:
            self._rebuilding[partition] = _Rebuild(target)
            log.warning(
                "partition %d: a rebuild of its hot view is under way (at offset %d of %d); continuing it",
                partition,
                position,
                target,
            )
            await self._hold(partition, target)
            return False
        self._rebuilding.pop(partition, None)
        return True

    async def _hold(self, partition: int, target: int) -> None:
        """Record a rebuild's target and close the gate for the partition, in one step, before
        the rebuild applies anything: whoever owns the partition next sees it unfinished."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(hv.REBUILDING_KEY, str(partition), str(target))
            pipe.hdel(hv.READY_KEY, str(partition))
            await pipe.execute()

    async def _mark_ready(self, partitions: Sequence[int]) -> None:
        if not partitions:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(hv.READY_KEY, mapping={str(p): "1" for p in partitions})
            pipe.hdel(hv.REBUILDING_KEY, *(str(p) for p in partitions))
            await pipe.execute()

    async def on_revoked(self, partitions: set[int]) -> None:
        self._forget(partitions)
        for p in partitions:
            self._owned.pop(p, None)
            self._rebuilding.pop(p, None)

    async def _start_rebuild(
        self, partition: int, until: int, consumer: PartitionControl, *, why: str
    ) -> None:
        await consumer.seek_to_beginning(partition)
        self._owned[partition] = None
        self._forget({partition})
        if until > 0:
            self.rebuilds += 1
            log.warning(
                "partition %d: %s; rebuilding its hot view from the start of the log (up to offset %d)",
                partition,
                why,
                until,
            )
            self._rebuilding[partition] = _Rebuild(until)
            await self._hold(partition, until)
        else:
            # Nothing written to it yet: nothing to rebuild. It gets a position all the same
            # (0), with its READY entry: a Redis that later loses everything loses that position
            # too, and the check of the positions then notices and marks it ready again (before,
            # an empty partition stayed not ready, and the ingress refused every write, until
            # the worker restarted).
            self._rebuilding.pop(partition, None)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(hv.APPLIED_KEY, str(partition), "0")
                pipe.hset(hv.READY_KEY, str(partition), "1")
                pipe.hdel(hv.REBUILDING_KEY, str(partition))
                await pipe.execute()
            self._owned[partition] = 0

    async def _positions(self, partitions: set[int]) -> dict[int, int]:
        return await self._offsets(hv.APPLIED_KEY, partitions)

    async def _targets(self, partitions: set[int]) -> dict[int, int]:
        """The targets of the rebuilds under way (recorded by `_hold`)."""
        return await self._offsets(hv.REBUILDING_KEY, partitions)

    async def _offsets(self, key: str, partitions: set[int]) -> dict[int, int]:
        fields = [str(p) for p in sorted(partitions)]
        values = await self._redis.hmget(key, fields)
        return {int(f): int(v) for f, v in zip(fields, values, strict=True) if v is not None}

    async def idle(self, consumer: PartitionControl) -> None:
        now = time.monotonic()
        if now - self._last_idle_check < IDLE_CHECK_S:
            return
        self._last_idle_check = now
        try:
            await self._check_lost(set(self._owned), consumer)
        except Exception as exc:
            # A periodic check: Redis down (killed, restarting) is retried at the next idle poll
            # or batch, never a reason to exit.
            if not is_outage(exc):
                raise
            log.warning("checking the positions in Redis failed (%r); checking again later", exc)

    async def healthy(self) -> bool:
        return bool(await self._redis.ping())

    async def _check_lost(self, partitions: set[int], consumer: PartitionControl) -> set[int]:
        """Partitions whose position in Redis is not the one this worker wrote; the consumer
        goes on from where Redis is for each, so a batch's records of them are not applied
        (they come again, or were applied already). Returns them.

        - Gone: Redis lost data (a restart without it, a flush). The partition is rebuilt from
          the start of the log. An empty partition has a position too (0), so it is noticed
          here and marked ready again.
        - Behind: Redis went back to an earlier point (restored from a snapshot, a failover
          that lost the last writes), or a stale member wrote. What was applied since that
          point (states, live-stream entries, claims) is applied again from there, and the
          partition is not ready until the position is back where this worker had it: a retry
          of a message in between must find its claim.
        - Ahead: another member applied the partition meanwhile (it was taken away and given
          back without this worker noticing): the consumer skips to there, and a rebuild that
          member left under way goes on."""
        written = {p for p in partitions if self._owned.get(p) is not None}
        if not written:
            return set()
        positions = await self._positions(written)
        lost = {p for p in written if p not in positions}
        moved = {p: positions[p] for p in written if p in positions and positions[p] != self._owned[p]}
        if moved:
            self._forget(set(moved))
            targets = await self._targets(set(moved))
            ready: list[int] = []
            for p, position in sorted(moved.items()):
                was = self._owned[p]
                assert was is not None
                target = targets.get(p)
                if position < was:
                    log.warning(
                        "partition %d: Redis has position %d, behind the %d this worker wrote (Redis went "
                        "back); applying the log again from there",
                        p,
                        position,
                        was,
                    )
                    # At least where this worker was, and where a rebuild of its own under way
                    # must reach (Redis may have gone back to before that rebuild's target).
                    pending = self._rebuilding.get(p)
                    target = max(was, target or 0, pending.until if pending else 0)
                    await self._hold(p, target)
                else:
                    log.warning(
                        "partition %d: written by another member up to %d; going on from there", p, position
                    )
                if await self._resume(p, position, target, consumer):
                    ready.append(p)
            await self._mark_ready(ready)
        if lost:
            ends = await consumer.end_offsets(lost)
            for p in sorted(lost):
                await self._start_rebuild(p, ends.get(p, 0), consumer, why="Redis lost its position")
        return lost | set(moved)

    # --- one batch -----------------------------------------------------------------------------

    async def process(self, records: Sequence[Record]) -> Rejected:
        if self._control is not None:
            lost = await self._check_lost({r.partition for r in records}, self._control)
            if lost:
                # The consumer goes on from where Redis is for those partitions; this batch's
                # records of them come again in order (or were applied already).
                records = [r for r in records if r.partition not in lost]
        rejected: list[tuple[Record, BaseException]] = []
        decoded: list[tuple[Event, Record]] = []
        for r in records:
            try:
                decoded.append((decode_event(r.value), r))
            except EventDecodeError as exc:
                rejected.append((r, exc))
        if self._erasures is not None:
            # Bounded (ErasureFollower.start_timeout_s; it used to wait as long as Kafka did not
            # answer, and the partitions' folds stood still). A registry not read in time raises
            # ErasuresUnavailable, a TimeoutError: the BatchConsumer retries the batch as an
            # outage, uncommitted and not dead-lettered, while the read goes on in the
            # background. Folding without the registry instead would bring an erased customer's
            # conversations back into the hot view.
            await self._erasures.start()
            if erased := self._erasures.erasures:
                decoded = [(e, r) for e, r in decoded if erased.keeps_event(e)]
        await self._fold_and_write(decoded, records, rejected)
        return rejected

    async def _load(self, slots: list[tuple[str, str]]) -> dict[tuple[str, str], Fold | None]:
        """The batch's conversations: from this worker's table, the others from Redis. They are
        taken out of the table and put back only once the batch is in Redis, so a batch that
        fails leaves nothing ahead of Redis behind."""
        folds: dict[tuple[str, str], Fold | None] = {}
        missing: list[tuple[str, str]] = []
        for slot in slots:
            fold = self._table.pop(slot, None)
            if fold is None:
                missing.append(slot)
            folds[slot] = fold
        if missing:
            async with self._redis.pipeline(transaction=False) as read:
                for tenant_id, conversation_id in missing:
                    read.hget(hv.conversation_key(tenant_id, conversation_id), hv.F_STATE)
                stored = await read.execute()
            for slot, raw in zip(missing, stored, strict=True):
                folds[slot] = Fold.from_json(json.loads(raw)) if raw else None
        self.table_misses += len(missing)
        return folds

    async def _fold_and_write(
        self,
        decoded: list[tuple[Event, Record]],
        records: Sequence[Record],
        rejected: list[tuple[Record, BaseException]],
    ) -> None:
        slots = list(dict.fromkeys((e.tenant_id, e.conversation_id) for e, _ in decoded))
        folds = await self._load(slots)
        if self._erasures is not None and self._erasures.erasures.tenants:
            # A conversation of an erased tenant that began before the erasure starts afresh:
            # the state cached here (or written back by a batch that raced the erasure) is not
            # carried on by its later events.
            erased = self._erasures.erasures
            for (tenant_id, conversation_id), fold in folds.items():
                if fold is not None and erased.erased(
                    tenant_id, conversation_id, fold.created_at_ns or fold.updated_at_ns
                ):
                    folds[(tenant_id, conversation_id)] = None
        # Where each conversation waited before the batch (agents' queues follow the net change).
        queued_before = {slot: _queued(fold) for slot, fold in folds.items()}
        # ...and when it was last active (the idle-close sweeper's index moves in steps).
        active_before = {slot: fold.updated_at_ns if fold is not None else -1 for slot, fold in folds.items()}
        changed: set[tuple[str, str]] = set()
        writes = _Writes(self._settings.live_stream_maxlen)
        stream = _ChunkStream(self._redis, writes.maxlen)
        try:
            await self._fold_into(decoded, folds, changed, writes, stream, rejected)
            if rejected and self._dead_letter_first is not None:
                # The fold's writes applied first: a batch that Redis refuses fails here, before a
                # dead letter, and does not dead-letter the same records again on every attempt.
                await stream.send(writes.rest())
                await stream.wait_applied()
                # Before the position passes them (see bind_dead_letter), and before the states: a
                # state written past a refused record makes the fold skip it as seen when the batch
                # is applied again (after a dead letter that did not reach Kafka), so it would
                # never be dead-lettered. Not again by the consumer. (Live entries and claims sent
                # already are as a batch that failed half-way leaves them: written again, the same.)
                await self._dead_letter_first(list(rejected))
                rejected.clear()
            for slot in changed:
                fold = folds[slot]
                assert fold is not None
                _requeue(writes, slot, queued_before[slot], fold)
                _track_activity(writes, slot, active_before[slot], fold)
                # The state last: what Redis holds of a batch is a prefix of its writes (see
                # _ChunkStream), and a state in it must have its queue and activity writes in it
                # too, for the batch applied again folds nothing of this conversation.
                writes.mirror(hv.conversation_key(*slot), fold)
                if writes.has_sealed():
                    await stream.send(writes.sealed())
            await stream.finish(writes.rest())
        finally:
            await stream.close()
        await self._write_positions(records, folds, changed)

    async def _fold_into(
        self,
        decoded: list[tuple[Event, Record]],
        folds: dict[tuple[str, str], Fold | None],
        changed: set[tuple[str, str]],
        writes: _Writes,
        stream: _ChunkStream,
        rejected: list[tuple[Record, BaseException]],
    ) -> None:
        """Fold the batch's events into `folds`, their live entries and claims into `writes`, each
        chunk sent as soon as it is full."""
        now_ms = int(time.time() * 1000)
        for event, record in decoded:
            slot = (event.tenant_id, event.conversation_id)
            fold = folds[slot]
            if fold is None:
                fold = folds[slot] = Fold.new(event.tenant_id, event.conversation_id)
            position = LogPosition(record.partition, record.offset)
            passed_from = (fold.last_partition, fold.last_offset)
            try:
                applied, sequence = fold.apply(event, position)
            except (
                Exception
            ) as exc:  # a pure step that leaves the state as it was: this record fails every time
                rejected.append((record, exc))
                continue
            if not applied:
                if (fold.last_partition, fold.last_offset) != passed_from:
                    # Passed over (a reply after the close, a decision written twice): no entry,
                    # but the state's position moved, as a replay's state says (trial, s29).
                    changed.add(slot)
                continue
            changed.add(slot)
            writes.live(
                hv.live_stream_key(*slot),
                position.cursor,
                hv.compact_live_event(record.value or b""),
                fold.status,
                fold.message_count,
                sequence,
            )
            _count_open(writes, event)
            claim = _claim_of(event)
            if claim:
                expires_ms = event.occurred_at.ToMilliseconds() + self._ttl_ms
                if expires_ms > now_ms:
                    writes.claim(
                        hv.idempotency_key(*slot, claim),
                        hv.encode_claim(
                            event.event_id, position.partition, position.offset, hv.event_claim_digest(event)
                        ),
                        expires_ms,
                    )
            if writes.has_sealed():
                await stream.send(writes.sealed())

    async def _write_positions(
        self,
        records: Sequence[Record],
        folds: dict[tuple[str, str], Fold | None],
        changed: set[tuple[str, str]],
    ) -> None:
        # Positions last, in their own round trip once every state is in: a Redis that kept them
        # kept everything above.
        last: dict[int, int] = {}
        for r in records:
            last[r.partition] = max(last.get(r.partition, -1), r.offset)
        now_ready = [
            p for p, o in last.items() if p in self._rebuilding and o + 1 >= self._rebuilding[p].until
        ]
        lost: set[int] = set()
        if last:
            args: list[str | int] = [len(last)]
            for p, o in last.items():
                args += [p, o + 1, 1 if self._owned.get(p) is not None else 0]
            reply = await self._set_positions(
                keys=[hv.APPLIED_KEY, hv.READY_KEY, hv.REBUILDING_KEY], args=[*args, *now_ready]
            )
            lost = {int(p) for p in reply}
        if lost:
            # Redis lost data after this batch's check (its positions are gone): they stay
            # unwritten, and the next batch's check starts the rebuild. What this batch wrote
            # there after the loss goes too (the rebuild expects an empty hot view: a state or
            # live stream that already has this batch would make it skip everything before).
            log.warning("partitions %s: Redis lost their positions during a batch", sorted(lost))
            self._forget(lost)
            async with self._redis.pipeline(transaction=False) as pipe:
                for slot in changed:
                    fold = folds[slot]
                    if fold is not None and fold.last_partition in lost:
                        pipe.hdel(hv.conversation_key(*slot), hv.F_STATE, hv.F_CURSOR)
                        pipe.unlink(hv.live_stream_key(*slot))
                await pipe.execute()
        for p, o in last.items():
            if p not in lost:
                self._owned[p] = o + 1
        for p in now_ready:
            if p not in lost:
                self._rebuilding.pop(p, None)
                log.info("partition %d: hot view rebuilt up to offset %d; accepting writes again", p, last[p])
        # The batch is in Redis: its states go (back) into the table, most recent last, keyed by
        # the state's own id strings (the batch's key strings are copies: ~150 B a conversation).
        for fold in folds.values():
            if fold is not None and fold.last_partition in self._owned and fold.last_partition not in lost:
                self._table[(fold.tenant_id, fold.conversation_id)] = fold
        while len(self._table) > self._table_max:
            del self._table[next(iter(self._table))]

    def _forget(self, partitions: set[int]) -> None:
        """Drop the table's states of these partitions (revoked, rebuilt, or written by another)."""
        if not partitions or not self._table:
            return
        for slot in [s for s, f in self._table.items() if f.last_partition in partitions]:
            del self._table[slot]


# Applies a batch's hot-view writes on the Redis side: one EVAL per chunk instead of three
# commands per event, because packing each command and parsing each reply in redis-py cost more
# than the fold itself. ARGV[1]: the live streams' approximate MAXLEN; ARGV[2]: the chunk, a
# sequence of operations, each a 1-byte code followed by length-prefixed strings (4-byte
# big-endian lengths); ARGV[3..]: field names (`_FIELD_NAMES`, from schemas/hotview.py).
#   X key id event status count sequence: XADD to a live stream (a repeated id is a redelivery,
#     refused by Redis, skipped);
#   C key value pxat: SET an idempotency claim;
#   H key state cursor closed_ns created_ns channel customer: HSET the conversation's fields
#     (the last four only when not empty);
#   * argc(2 bytes) args...: any other command.
APPLY_SCRIPT = """
local blob = ARGV[2]
local maxlen = ARGV[1]
local F_STATE, F_CURSOR, F_CLOSED, F_CREATED, F_CHANNEL, F_CUSTOMER = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local S_EVENT, S_STATUS, S_MESSAGES, S_SEQUENCE = ARGV[9], ARGV[10], ARGV[11], ARGV[12]
local pos = 1
local size = #blob
local function str()
  local len
  len, pos = struct.unpack('>I4', blob, pos)
  local s = string.sub(blob, pos, pos + len - 1)
  pos = pos + len
  return s
end
while pos <= size do
  local op = string.sub(blob, pos, pos)
  pos = pos + 1
  if op == 'X' then
    local key = str()
    local id = str()
    local event = str()
    local status = str()
    local count = str()
    local sequence = str()
    local reply
    if sequence == '' then
      reply = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, id,
        S_EVENT, event, S_STATUS, status, S_MESSAGES, count)
    else
      reply = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, id,
        S_EVENT, event, S_STATUS, status, S_MESSAGES, count, S_SEQUENCE, sequence)
    end
    if type(reply) == 'table' and reply.err and not string.find(reply.err, 'equal or smaller', 1, true) then
      return reply
    end
  elseif op == 'C' then
    local key = str()
    local value = str()
    local at = str()
    redis.call('SET', key, value, 'PXAT', at)
  elseif op == 'H' then
    local args = {'HSET', str(), F_STATE}
    args[4] = str()
    args[5] = F_CURSOR
    args[6] = str()
    local closed = str()
    local created = str()
    local channel = str()
    local customer = str()
    if closed ~= '' then
      args[#args + 1] = F_CLOSED
      args[#args + 1] = closed
    end
    if created ~= '' then
      args[#args + 1] = F_CREATED
      args[#args + 1] = created
      args[#args + 1] = F_CHANNEL
      args[#args + 1] = channel
      args[#args + 1] = F_CUSTOMER
      args[#args + 1] = customer
    end
    redis.call(unpack(args))
  elseif op == '*' then
    local argc
    argc, pos = struct.unpack('>H', blob, pos)
    local args = {}
    for i = 1, argc do
      args[i] = str()
    end
    redis.call(unpack(args))
  else
    return redis.error_reply('unknown operation ' .. op)
  end
end
return 1
"""
# The batch's positions, after its states: KEYS[1] the positions hash, KEYS[2] the readiness
# hash, KEYS[3] the rebuild targets (a rebuilt partition's is removed with its READY set); ARGV[1] n, then n triples (partition, next offset, 1 if this worker wrote the partition's
# position before), then the partitions now rebuilt. A position this worker wrote before and Redis
# no longer has means Redis lost data since the batch's check: it is not written again (that would
# hide the loss; the next batch's check sees it missing and rebuilds the partition). Returns
# those partitions.
POSITIONS_SCRIPT = """
local n = tonumber(ARGV[1])
local lost = {}
local gone = {}
for i = 0, n - 1 do
  local partition = ARGV[2 + 3 * i]
  if ARGV[4 + 3 * i] == '1' and redis.call('HEXISTS', KEYS[1], partition) == 0 then
    lost[#lost + 1] = partition
    gone[partition] = true
  else
    redis.call('HSET', KEYS[1], partition, ARGV[3 + 3 * i])
  end
end
for j = 2 + 3 * n, #ARGV do
  if not gone[ARGV[j]] then
    redis.call('HSET', KEYS[2], ARGV[j], '1')
    redis.call('HDEL', KEYS[3], ARGV[j])
  end
end
return lost
"""

_APPLY_SCRIPT_BYTES = APPLY_SCRIPT.encode()

_FIELD_NAMES = (
    hv.F_STATE,
    hv.F_CURSOR,
    hv.F_CLOSED_NS,
    hv.F_CREATED_NS,
    hv.F_CHANNEL,
    hv.F_CUSTOMER,
    hv.S_EVENT,
    hv.S_STATUS,
    hv.S_MESSAGES,
    hv.S_SEQUENCE,
)

_LEN = struct.Struct(">I").pack
_ARGC = struct.Struct(">H").pack
_EMPTY = b"\x00\x00\x00\x00"
# Operations per script call: each call blocks Redis for its duration (a few µs per operation),
# so chunks stay around a millisecond and the ingress's commands interleave with them.
CHUNK_OPERATIONS = 256


def _s(value: str) -> bytes:
    data = value.encode()
    return _LEN(len(data)) + data


def _b(data: bytes) -> bytes:
    return _LEN(len(data)) + data


def _i(value: int) -> bytes:
    data = b"%d" % value
    return _LEN(len(data)) + data


class _Writes:
    """A batch's writes, encoded for `APPLY_SCRIPT`, in order, cut into chunks."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._chunks: list[bytes] = []
        self._parts: list[bytes] = []
        self._operations = 0
        # Chunks handed out by `sealed` so far.
        self._handed = 0

    def _added(self) -> None:
        self._operations += 1
        if self._operations >= CHUNK_OPERATIONS:
            self._seal()

    def _seal(self) -> None:
        if self._parts:
            self._chunks.append(b"".join(self._parts))
        self._parts, self._operations = [], 0

    def live(self, key: str, entry_id: str, event: bytes, status: str, count: int, sequence: int) -> None:
        self._parts += (b"X", _s(key), _s(entry_id), _b(event), _s(status), _i(count))
        self._parts.append(_i(sequence) if sequence else _EMPTY)
        self._added()

    def claim(self, key: str, value: str, pxat: int) -> None:
        self._parts += (b"C", _s(key), _s(value), _i(pxat))
        self._added()

    def mirror(self, key: str, state: Fold) -> None:
        """The conversation hash's fields the worker owns."""
        self._parts += (b"H", _s(key), _s(state.json_text()), _s(f"{state.last_offset}-1"))
        self._parts.append(_i(state.closed_at_ns) if state.status == STATUS_CLOSED else _EMPTY)
        if state.created_at_ns:
            self._parts += (_i(state.created_at_ns), _i(state.channel), _s(state.customer_id))
        else:
            self._parts += (_EMPTY, _EMPTY, _EMPTY)
        self._added()

    def command(self, *args: str | int) -> None:
        self._parts += (b"*", _ARGC(len(args)))
        self._parts += (_s(a) if isinstance(a, str) else _i(a) for a in args)
        self._added()

    def has_sealed(self) -> bool:
        return len(self._chunks) > self._handed

    def sealed(self) -> list[bytes]:
        """The chunks sealed since the last call."""
        chunks = self._chunks[self._handed :]
        self._handed = len(self._chunks)
        return chunks

    def rest(self) -> list[bytes]:
        """The chunks not handed out yet, the last one sealed."""
        self._seal()
        return self.sealed()


class _ChunkStream:
    """A batch's chunks (`APPLY_SCRIPT` calls) written to Redis as each is sealed, on one
    connection, so Redis applies the first chunks while the worker folds the rest (sent all at
    the end instead, the worker waited for Redis about half of a catch-up's time: py-spy,
    RESULTS.md).

    One chunk is under way at a time: a chunk is sent once the one before it was applied, and the
    first that fails raises here, with nothing after it sent. So what Redis holds of a failed batch
    is always a prefix of its writes (the failed chunk's own operations up to its error), and the
    batch applied again from the states Redis holds redoes the rest in order. Were the later chunks
    applied after a failed one (they were, when every chunk was sent before any reply was read), a
    conversation's live entries in the failed chunk would be behind its later ones and refused for
    good, and a state written past them would make the retry fold nothing (review, twenty-first
    session). Each chunk is an EVAL, not an EVALSHA: a Redis that forgot the script (a restart, a
    SCRIPT FLUSH) never answers one chunk NOSCRIPT and a later one with its effects. Costs little:
    the fold of a chunk's events takes longer than Redis's applying the chunk before it.

    Errors are redis-py's (its connection, handshake, socket timeout and reply parser); a
    connection whose batch failed or was cancelled is closed, never handed back to the pool with a
    reply unread."""

    def __init__(self, redis: aioredis.Redis, maxlen: int) -> None:
        self._pool = redis.connection_pool
        self._maxlen = maxlen
        self._conn: Any = None
        self._under_way = False
        self._clean = False

    async def send(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self._conn is None:
                self._conn = await self._pool.get_connection()
            await self.wait_applied()
            packed = self._conn.pack_command(
                "EVAL", _APPLY_SCRIPT_BYTES, 0, self._maxlen, chunk, *_FIELD_NAMES
            )
            await self._conn.send_packed_command(packed, check_health=False)
            self._under_way = True

    async def wait_applied(self) -> None:
        """Waits for the chunk under way, if any; raises its error reply (ResponseError)."""
        if self._under_way:
            self._under_way = False
            await self._conn.read_response()

    async def finish(self, chunks: list[bytes]) -> None:
        """Send the last chunks; returns once every chunk is applied."""
        await self.send(chunks)
        await self.wait_applied()
        self._clean = True

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if not self._clean:
                await conn.disconnect(nowait=True)
        finally:
            await self._pool.release(conn)


def _queued(fold: Fold | None) -> tuple[str, int]:
    """The queue a conversation waits in ('' if none) and since when."""
    if fold is None or fold.status == STATUS_CLOSED:
        return "", 0
    return fold.queue, fold.handoff_at_ns


def _requeue(writes: _Writes, slot: tuple[str, str], before: tuple[str, int], after: Fold) -> None:
    """Keep the agents' queues (sorted sets, oldest handoff first) in step with the states."""
    was, was_at = before
    now, now_at = _queued(after)
    tenant_id, conversation_id = slot
    if was and was != now:
        writes.command("ZREM", hv.queue_key(tenant_id, was), conversation_id)
    if now and (now != was or now_at != was_at):
        writes.command("ZADD", hv.queue_key(tenant_id, now), now_at, conversation_id)


def _track_activity(writes: _Writes, slot: tuple[str, str], before_ns: int, after: Fold) -> None:
    """The tenant's open conversations by last activity (services/ingress/_idle.py closes the idle
    ones): moved only once it advanced a step, so a busy conversation costs a write per step, not
    per batch; GT: a replayed older batch never moves it back."""
    tenant_id, conversation_id = slot
    if after.status == STATUS_CLOSED:
        writes.command("ZREM", hv.activity_key(tenant_id), conversation_id)
        return
    step_ns = hv.ACTIVITY_STEP_MS * 1_000_000
    if before_ns < 0 or after.updated_at_ns // step_ns != before_ns // step_ns:
        writes.command(
            "ZADD", hv.activity_key(tenant_id), "GT", after.updated_at_ns // 1_000_000, conversation_id
        )


def _count_open(writes: _Writes, event: Event) -> None:
    """The tenant's open conversations (services/ingress/_quotas.py): a folded start is there for
    good (score 0, replacing the ingress's expiring reservation) until its close is folded."""
    kind = event_type(event)
    if kind == "conversation_started":
        writes.command("ZADD", hv.open_conversations_key(event.tenant_id), 0, event.conversation_id)
        writes.command("SADD", hv.ACTIVE_TENANTS_KEY, event.tenant_id)
    elif kind == "conversation_closed":
        writes.command("ZREM", hv.open_conversations_key(event.tenant_id), event.conversation_id)


def _claim_of(event: Event) -> str:
    """The idempotency claim an event settles (what a retry of its write must find)."""
    kind = event_type(event)
    if kind == "message_received":
        return str(event.message_received.client_message_id)
    if kind == "agent_message_sent":
        return hv.agent_claim(event.agent_message_sent.client_message_id)
    if kind == "conversation_started":
        return hv.START_CLAIM
    if kind == "conversation_closed":
        return hv.CLOSE_CLAIM
    return ""


def sessions_consumer(settings: Settings, redis: aioredis.Redis) -> tuple[BatchConsumer, SessionsProcessor]:
    processor = SessionsProcessor(settings, redis, ErasureFollower(settings))
    consumer = BatchConsumer(
        settings,
        processor,
        topic=settings.conversation_topic,
        group_id="switchboard-sessions",
        batch_size=settings.batch_size,
        instance_id=instance_id(settings, "sessions"),
    )
    return consumer, processor


async def serve_sessions(settings: Settings) -> None:
    redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=10, health_check_interval=5)
    consumer, processor = sessions_consumer(settings, redis)
    # The erasure registry's read begins with the worker, not inside its first batch.
    processor.begin()
    await run_until_signalled(consumer, redis.aclose, processor.close)


def run_sessions(settings: Settings, loglevel: str = "info") -> None:
    """One worker process, or (settings.sessions_processes > 1) a supervisor of that many."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.sessions_processes > 1:
        from streams.sessions._processes import supervise

        asyncio.run(supervise(settings, settings.sessions_processes, loglevel))
        return
    asyncio.run(serve_sessions(settings))


__all__ = ["SessionsProcessor", "run_sessions", "serve_sessions", "sessions_consumer"]
