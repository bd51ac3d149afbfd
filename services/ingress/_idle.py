"""Idle close: conversations nobody touched for `idle_close_after_s` are closed by the system.

Abandoned conversations used to stay open for ever and keep counting against the tenant's
`max_open_conversations` quota. Each ingress process runs a sweeper: every
`idle_sweep_interval_s` it goes through the tenants that have conversations
(`hv.ACTIVE_TENANTS_KEY`), takes the open conversations whose last activity is older than the
tenant's idle time from the index the sessions worker keeps (`hv.activity_key`, by the latest
folded event's time), checks each against its state (the index may lag by a step), and closes the
idle ones with ConversationClosed(resolution "idle", closed_by SENDER_SYSTEM) through the same path
as CloseConversation (`ConversationWrites.close_for_system`: hold, wait for other processes'
unsettled messages, publish, mark closed, free the quota place). So a message racing an idle close
is before the close in the log or refused, as with any close; one acknowledged in the moment
between the check and the hold is before the close (the conversation closes right after it).

A tenant is swept by one process at a time: a Redis lock with an expiry (a sweeper that dies
holding it only delays that tenant's sweep). The lock saves work, not correctness: two closes of
one conversation meet at its close claim, and the second is a no-op.

Open conversations started before the sessions worker kept the activity index are put into it
once per Redis, by the first sweeper to start (`backfill`: a SCAN of the tenants' open sets).

The folded state is only as current as the sessions worker: while it lags (stopped, restarting,
catching up), a conversation whose customer wrote a moment ago looks idle in it. So a sweep first
takes Kafka's end offsets and waits (up to `FOLD_WAIT_S`) until the worker has folded up to them
(`hv.APPLIED_KEY`); a candidate is closed only when its partition's fold got there, else it waits
for a later sweep.

The idle time is the tenant's own (`switchboard tenants update T --idle-close-after S`), else the
settings' default; 0 turns it off. A process that cannot reach Redis or Kafka skips the sweep and
tries again at the next one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Counter

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from schemas import hotview as hv
from services.auth._limits import IDLE_CLOSE_AFTER
from services.auth._model import Registry
from services.ingress import _validation as v
from services.ingress._writes import ConversationWrites
from services.settings import Settings
from streams._consumer import is_outage, raise_if_cancelling

log = logging.getLogger(__name__)

RESOLUTION = "idle"
# Conversations one tenant's sweep looks at, and closes at once.
SWEEP_BATCH = 200
CLOSE_CONCURRENCY = 16
# A tenant's lock outlives a sweep that is slow, not one whose process died.
LOCK_TTL_MS = 120_000
# How long a sweep waits for the sessions worker to fold what Kafka had when the sweep began.
FOLD_WAIT_S = 5.0

IDLE_CLOSED = Counter("switchboard_idle_closed_total", "Conversations closed for inactivity")
SWEEP_FAILURES = Counter(
    "switchboard_idle_sweep_failures_total", "Tenants' idle-close sweeps that failed (logged with the tenant)"
)

# Set once every open conversation that predates the activity index is in it (see `backfill`).
BACKFILLED_KEY = "sb:idle:backfilled"
_SCAN_COUNT = 1000

# Compare-and-delete: only the owner's lock is released.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def lock_key(tenant_id: str) -> str:
    return f"sb:{{{tenant_id}}}:idle-sweep"


@dataclass(frozen=True, slots=True)
class Candidate:
    conversation_id: str
    indexed_ms: int  # its last activity in the index


def idle_after_s(registry: Registry | None, settings: Settings, tenant_id: str) -> float:
    """The tenant's idle time: its own setting, else the default (0: never)."""
    tenant = registry.tenants.get(tenant_id) if registry is not None else None
    own = tenant.settings if tenant is not None else {}
    return float(own.get(IDLE_CLOSE_AFTER, settings.idle_close_after_s))


CLOSE = "close"
FORGET = "forget"


def last_activity_ms(state_json: bytes | None) -> int | None:
    """An open conversation's last activity from its state (pure); None when closed or unknown."""
    if not state_json:
        return None
    state: dict[str, Any] = json.loads(state_json)
    if state.get("status") == "closed":
        return None
    return int(state.get("updated_at_ns", 0)) // 1_000_000


def folded_partition(state_json: bytes | None) -> int:
    """The partition of the conversation's events, from its state (pure); -1 when unknown."""
    if not state_json:
        return -1
    return int(json.loads(state_json).get("last_partition", -1))


def verdict(state_json: bytes | None, closed: bool, cutoff_ms: int) -> str | int:
    """What to do with a candidate (pure): CLOSE it; FORGET it (closed already: the index drops
    it); or its last activity in ms, newer than the cutoff, for the index (0: no state, leave it)."""
    if closed:
        return FORGET
    if not state_json:
        return 0
    last_ms = last_activity_ms(state_json)
    if last_ms is None:
        return FORGET
    return last_ms if last_ms > cutoff_ms else CLOSE


class IdleSweeper:
    """Closes idle conversations; `run` forever, or `sweep` once (tests)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        writes: ConversationWrites,
        registry: Callable[[], Registry | None] | None = None,
        ready: Callable[[], Any] | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._writes = writes
        self._registry = registry or (lambda: None)
        self._ready = ready
        self._owner = uuid.uuid4().hex.encode()
        self._release = redis.register_script(_RELEASE)
        self.closed = 0

    async def run(self) -> None:
        interval = self._settings.idle_sweep_interval_s
        backfilled = False
        while True:
            try:
                if not backfilled:
                    if not await self._redis.exists(BACKFILLED_KEY):
                        await self.backfill()
                        await self._redis.set(BACKFILLED_KEY, b"1")
                    backfilled = True
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling(exc)
                log.warning("idle close: the sweep failed (%r); trying again in %.0fs", exc, interval)
            await asyncio.sleep(interval)

    async def backfill(self) -> int:
        """Put the open conversations the activity index lacks into it (they were started before
        the sessions worker kept it, which only adds a conversation when it folds one of its
        events): every tenant's open set, once per Redis. Returns how many it added. NX: the
        worker's own entries win; a conversation closed meanwhile is dropped by the next sweep."""
        added = 0
        async for raw_key in self._redis.scan_iter(match="sb:{*}:open", count=_SCAN_COUNT, _type="zset"):
            key = raw_key.decode()
            tenant_id = key[len("sb:{") : -len("}:open")]
            if not tenant_id:
                continue
            await self._redis.sadd(hv.ACTIVE_TENANTS_KEY, tenant_id)
            # Score 0: folded starts (a positive score is a reservation, not open yet).
            members: Any = await self._redis.zrangebyscore(key, 0, 0)
            index = hv.activity_key(tenant_id)
            for start in range(0, len(members), SWEEP_BATCH):
                chunk = [m.decode() for m in members[start : start + SWEEP_BATCH]]
                async with self._redis.pipeline(transaction=False) as pipe:
                    for conversation_id in chunk:
                        pipe.zscore(index, conversation_id)
                        pipe.hget(hv.conversation_key(tenant_id, conversation_id), hv.F_STATE)
                    found = await pipe.execute()
                missing: dict[str, int] = {}
                for i, conversation_id in enumerate(chunk):
                    score, state = found[2 * i], found[2 * i + 1]
                    last_ms = last_activity_ms(state) if score is None else None
                    if last_ms:
                        missing[conversation_id] = last_ms
                if missing:
                    count: Any = await self._redis.zadd(index, missing, nx=True)
                    added += int(count)
        if added:
            log.info("idle close: %d open conversations from before the activity index added to it", added)
        return added

    async def sweep(self) -> int:
        """One round over every tenant; returns how many conversations it closed."""
        if self._ready is not None and not await self._ready():
            return 0  # the hot view is being rebuilt: closes would be refused anyway
        members: Any = await self._redis.smembers(hv.ACTIVE_TENANTS_KEY)
        registry = self._registry()
        now_ms = int(time.time() * 1000)
        due: list[tuple[str, float]] = []
        for raw in sorted(members):
            tenant_id = raw.decode()
            after_s = idle_after_s(registry, self._settings, tenant_id)
            if after_s > 0:
                due.append((tenant_id, after_s))
        if not due:
            return 0
        # Which tenants have a candidate at all: one round trip, before any lock.
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant_id, after_s in due:
                cutoff_ms = now_ms - math.ceil(after_s * 1000)
                pipe.zrangebyscore(hv.activity_key(tenant_id), "-inf", cutoff_ms, start=0, num=1)
            # A tenant's key that cannot be read (wrong type, ...) is that tenant's failure only.
            firsts = await pipe.execute(raise_on_error=False)
        closed = 0
        folded: set[int] | None = None
        for (tenant_id, after_s), first in zip(due, firsts, strict=True):
            if isinstance(first, Exception):
                self._tenant_failed(tenant_id, first)
                continue
            if first:
                if folded is None:
                    # Not the tenant's: Kafka or Redis away ends the round (`run` retries it).
                    folded = await self.folded_partitions()
                try:
                    closed += await self.sweep_tenant(tenant_id, after_s, folded)
                except Exception as exc:
                    # Each tenant on its own: one whose sweep fails every time (a corrupt state,
                    # a key of the wrong type) used to end every round before the tenants after it.
                    raise_if_cancelling(exc)
                    if is_outage(exc):
                        raise  # Redis or Kafka away is nobody's tenant: the round ends, `run` retries
                    self._tenant_failed(tenant_id, exc)
        return closed

    def _tenant_failed(self, tenant_id: str, exc: BaseException) -> None:
        SWEEP_FAILURES.inc()
        log.warning(
            "idle close: the sweep of tenant %s failed (%r); the other tenants' go on", tenant_id, exc
        )

    async def folded_partitions(self) -> set[int]:
        """The partitions whose folded states hold every event Kafka had when this was called:
        Kafka's end offsets, then (waiting up to FOLD_WAIT_S) the sessions worker's positions."""
        topic = self._settings.conversation_topic
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._settings.kafka_bootstrap, enable_auto_commit=False
        )
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()
                partitions = consumer.partitions_for_topic(topic) or set()
            ends = await consumer.end_offsets([TopicPartition(topic, p) for p in sorted(partitions)])
        finally:
            await consumer.stop()
        deadline = time.monotonic() + FOLD_WAIT_S
        while True:
            applied: Any = await self._redis.hgetall(hv.APPLIED_KEY)
            folded = {
                tp.partition
                for tp, end in ends.items()
                if int(applied.get(str(tp.partition).encode(), 0)) >= end
            }
            if len(folded) == len(ends) or time.monotonic() > deadline:
                if len(folded) < len(ends):
                    log.info(
                        "idle close: the sessions worker has not folded partitions %s up to now; "
                        "their conversations wait for a later sweep",
                        sorted(tp.partition for tp in ends if tp.partition not in folded),
                    )
                return folded
            await asyncio.sleep(0.1)

    async def sweep_tenant(self, tenant_id: str, after_s: float, folded: set[int] | None = None) -> int:
        """Close the tenant's conversations idle for `after_s` (unless another process is
        sweeping the tenant); returns how many it closed. `folded`: the partitions whose fold is
        current (folded_partitions, taken now when not given)."""
        cutoff_ms = int(time.time() * 1000) - math.ceil(after_s * 1000)
        key = lock_key(tenant_id)
        if not await self._redis.set(key, self._owner, nx=True, px=LOCK_TTL_MS):
            return 0  # another process is sweeping this tenant
        try:
            if folded is None:
                folded = await self.folded_partitions()
            candidates = await self._candidates(tenant_id, cutoff_ms, folded)
            closing = asyncio.Semaphore(CLOSE_CONCURRENCY)

            async def close(conversation_id: str) -> bool:
                async with closing:
                    return await self._close(tenant_id, conversation_id)

            results = await asyncio.gather(*(close(c) for c in candidates))
            return sum(results)
        finally:
            await self._release(keys=[key], args=[self._owner])

    async def _candidates(self, tenant_id: str, cutoff_ms: int, folded: set[int]) -> list[str]:
        """The tenant's conversations idle since before `cutoff_ms`, checked against their state
        (read after `folded` was taken: only those of the partitions in it are judged); the index
        of the others is put right (it lags by up to a step)."""
        index = hv.activity_key(tenant_id)
        rows: Any = await self._redis.zrangebyscore(
            index, "-inf", cutoff_ms, start=0, num=SWEEP_BATCH, withscores=True
        )
        found = [Candidate(raw.decode(), int(score)) for raw, score in rows]
        if not found:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for c in found:
                pipe.hmget(hv.conversation_key(tenant_id, c.conversation_id), hv.F_STATE, hv.F_CLOSED_NS)
            states = await pipe.execute()
        idle: list[str] = []
        async with self._redis.pipeline(transaction=False) as fix:
            for c, (state, closed_ns) in zip(found, states, strict=True):
                what = verdict(state, closed_ns is not None, cutoff_ms)
                if what == CLOSE:
                    if folded_partition(state) in folded:
                        idle.append(c.conversation_id)
                elif what == FORGET:
                    fix.zrem(index, c.conversation_id)
                elif isinstance(what, int) and what > c.indexed_ms:
                    # XX: a close folded meanwhile removed it; it is not put back.
                    fix.zadd(index, {c.conversation_id: what}, xx=True, gt=True)
            await fix.execute()
        return idle

    async def _close(self, tenant_id: str, conversation_id: str) -> bool:
        try:
            closed = await self._writes.close_for_system(tenant_id, conversation_id, RESOLUTION)
        except v.RequestRejected as exc:
            # Being closed by someone else, messages still in flight, Kafka away: next sweep.
            log.info("idle close of %s/%s deferred: %s", tenant_id, conversation_id, exc.message)
            return False
        if closed:
            IDLE_CLOSED.inc()
            self.closed += 1
            log.info("closed idle conversation %s/%s", tenant_id, conversation_id)
        return closed
