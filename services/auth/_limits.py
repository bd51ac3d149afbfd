"""Fair use: token buckets per tenant and per API key, shared by every ingress through Redis.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; a write costs one token
per message (a SendMessageBatch takes all of its messages' tokens in one check, all or nothing;
an UpsertDocuments one per document and started 8 KiB of it, a DeleteDocument one).
The tenant's bucket and the key's are checked and charged together by one Lua script, on Redis's
clock, so N processes on M hosts share one budget. A stream (SendMessages) leases tokens ahead in
growing chunks (1, 2, 4 … 32), so a long stream costs one Redis call per chunk, not per message;
what it did not use is given back when it ends.

Limits come from the tenant's record on the tenants topic (`switchboard tenants update T --rate
… --burst …`), else from the settings' defaults; 0 is unlimited (the default), and an unlimited
call never reaches Redis. Only keyed calls are limited: an ingress with no keys at all is the
loopback-only development mode. If Redis fails or is slow the call goes through (fail open), logged
and counted: an outage of the limiter must not become an outage of the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as aioredis
from prometheus_client import Counter

from services.auth._model import Principal, Registry, TenantRecord
from services.settings import Settings

log = logging.getLogger(__name__)

# Keys of a tenant record's `settings` that this module reads.
RATE = "rate_per_s"
BURST = "burst"
KEY_RATE = "key_rate_per_s"
KEY_BURST = "key_burst"
# Quotas (services/ingress/_quotas.py): whole numbers, 0 unlimited.
MAX_OPEN_CONVERSATIONS = "max_open_conversations"
MAX_KNOWLEDGE_DOCUMENTS = "max_knowledge_documents"
# Seconds without activity after which a conversation is closed (services/ingress/_idle.py); 0 never.
IDLE_CLOSE_AFTER = "idle_close_after_s"
LIMIT_SETTINGS = (
    RATE,
    BURST,
    KEY_RATE,
    KEY_BURST,
    MAX_OPEN_CONVERSATIONS,
    MAX_KNOWLEDGE_DOCUMENTS,
    IDLE_CLOSE_AFTER,
)
_WHOLE = frozenset({BURST, KEY_BURST, MAX_OPEN_CONVERSATIONS, MAX_KNOWLEDGE_DOCUMENTS})

# The methods that spend tokens (one per message or per write); reads and admin calls are free.
_STREAMED = "/switchboard.v1.ChatService/SendMessages"
_BATCH = "/switchboard.v1.ChatService/SendMessageBatch"
_UPSERT = "/switchboard.v1.KnowledgeService/UpsertDocuments"
# A knowledge document costs one token per started 8 KiB (a message, at most 8 KiB, costs one):
# indexing is paid for by its size, and a flood of upserts meets the same bucket as messages.
DOCUMENT_TOKEN_BYTES = 8 * 1024
COSTED = frozenset(
    {
        "/switchboard.v1.ChatService/StartConversation",
        "/switchboard.v1.ChatService/SendMessage",
        _STREAMED,
        _BATCH,
        "/switchboard.v1.ChatService/CloseConversation",
        "/switchboard.v1.ChatService/RateConversation",
        "/switchboard.v1.AgentService/SendAgentMessage",
        _UPSERT,
        "/switchboard.v1.KnowledgeService/DeleteDocument",
    }
)
MAX_LEASE = 32
_WARN_EVERY_S = 10.0
_MAX_EMPTY_PLANS = 10_000

RATE_LIMITED = Counter(
    "switchboard_rate_limited_total", "Calls refused by a rate limit, by the limit that refused", ["scope"]
)
RATE_LIMIT_FAIL_OPEN = Counter(
    "switchboard_rate_limit_fail_open_total",
    "Limited calls let through unchecked because the limiter's Redis failed or was slow",
)


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` tokens a second, at most `burst` at once."""

    rate: float
    burst: int

    def describe(self) -> str:
        return f"{self.rate:g} messages/s (burst {self.burst})"


def make_limit(rate: float, burst: int) -> Limit | None:
    """None when unlimited (rate 0); a burst of 0 means one second's worth of the rate."""
    if rate <= 0:
        return None
    return Limit(float(rate), burst if burst > 0 else max(1, math.ceil(rate)))


def limits_of(tenant: TenantRecord | None, settings: Settings) -> tuple[Limit | None, Limit | None]:
    """(the tenant's limit, each of its keys' limit): the tenant's own settings, else the defaults."""
    own: Mapping[str, Any] = tenant.settings if tenant is not None else {}
    return (
        make_limit(
            float(own.get(RATE, settings.tenant_rate_per_s)), int(own.get(BURST, settings.tenant_burst))
        ),
        make_limit(
            float(own.get(KEY_RATE, settings.key_rate_per_s)), int(own.get(KEY_BURST, settings.key_burst))
        ),
    )


def check_limit_settings(values: Mapping[str, Any]) -> dict[str, float | int]:
    """Validated limit settings for a tenant record (raises ValueError with the reason)."""
    checked: dict[str, float | int] = {}
    for name, value in values.items():
        if name not in LIMIT_SETTINGS:
            raise ValueError(f"unknown limit setting {name!r}; known: {', '.join(LIMIT_SETTINGS)}")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{name} must be a number >= 0 (0: unlimited), got {value!r}")
        if name in _WHOLE:
            if number != int(number):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            checked[name] = int(number)
        else:
            checked[name] = number
    return checked


# --- the bucket math (pure; the Lua script below is the same, on Redis's clock) ------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at_ms: int


@dataclass(frozen=True, slots=True)
class Decision:
    granted: int  # 0: refused
    retry_after_ms: int  # when refused: how long until `need` tokens are there
    limiting: int  # when refused: index of the bucket that is furthest from `need`
    buckets: tuple[Bucket, ...]  # the state to keep (unchanged when refused)


def refill(bucket: Bucket | None, limit: Limit, now_ms: int) -> float:
    """Tokens in the bucket at `now_ms` (a bucket never seen, or expired, is full)."""
    if bucket is None:
        return float(limit.burst)
    elapsed = max(0, now_ms - bucket.at_ms)
    return min(float(limit.burst), bucket.tokens + elapsed * limit.rate / 1000.0)


def take(
    buckets: Sequence[Bucket | None], limits: Sequence[Limit], now_ms: int, want: int, need: int
) -> Decision:
    """Take between `need` and `want` tokens from every bucket at once, or none.

    Granted: as many whole tokens as every bucket holds, up to `want`. Refused when a bucket holds
    fewer than `need`: the retry-after is the longest wait for `need` tokens over all buckets."""
    tokens = [refill(b, lim, now_ms) for b, lim in zip(buckets, limits, strict=True)]
    granted = want
    retry_after_ms, limiting = 0, -1
    for i, (have, lim) in enumerate(zip(tokens, limits, strict=True)):
        granted = min(granted, math.floor(have))
        if have < need:
            wait = math.ceil((need - have) * 1000.0 / lim.rate)
            if wait > retry_after_ms:
                retry_after_ms, limiting = wait, i
    if granted < need:
        kept = tuple(b if b is not None else Bucket(t, now_ms) for b, t in zip(buckets, tokens, strict=True))
        return Decision(0, max(1, retry_after_ms), limiting, kept)
    return Decision(granted, 0, -1, tuple(Bucket(t - granted, now_ms) for t in tokens))


# KEYS: the buckets. ARGV: want, need, then rate and burst of each bucket. Returns {granted,
# retry_after_ms, limiting (1-based, 0 when granted)}. Mirrors `take`; a refusal writes nothing.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local need = tonumber(ARGV[2])
local tokens = {}
local granted = want
local retry, limiting = 0, 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  local have = tonumber(state[1])
  local at = tonumber(state[2])
  if have == nil or at == nil then
    have = burst
  elseif now > at then
    have = math.min(burst, have + (now - at) * rate / 1000)
  end
  tokens[i] = have
  granted = math.min(granted, math.floor(have))
  if have < need then
    local wait = math.ceil((need - have) * 1000 / rate)
    if wait > retry then retry, limiting = wait, i end
  end
end
if granted < need then
  return {0, math.max(1, retry), limiting}
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  redis.call('HSET', KEYS[i], 'tokens', string.format('%.6f', tokens[i] - granted), 'ms', now)
  -- Gone once it would be full again anyway: idle tenants cost no memory.
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst * 1000 / rate) + 1000)
end
return {granted, 0, 0}
"""

# KEYS: buckets; ARGV: n, then the burst of each. Gives back unused leased tokens (capped at burst).
_GIVE_BACK = """
for i = 1, #KEYS do
  local have = tonumber(redis.call('HGET', KEYS[i], 'tokens'))
  if have ~= nil then
    local burst = tonumber(ARGV[1 + i])
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.6f', math.min(burst, have + tonumber(ARGV[1]))))
  end
end
return 1
"""


def bucket_key(tenant_id: str, key_id: str | None = None) -> str:
    # One hash tag per tenant: both buckets of a check live in one Redis Cluster slot.
    return f"sb:rl:{{{tenant_id}}}:tenant" if key_id is None else f"sb:rl:{{{tenant_id}}}:key:{key_id}"


@dataclass(frozen=True, slots=True)
class Plan:
    """The buckets one principal's calls are charged to."""

    keys: tuple[str, ...]
    limits: tuple[Limit, ...]
    names: tuple[str, ...]  # for messages: "tenant 'acme'", "API key 3f9a… of tenant 'acme'"


def plan_for(registry: Registry, settings: Settings, principal: Principal) -> Plan | None:
    """None when neither the tenant nor its keys are limited."""
    tenant_limit, key_limit = limits_of(registry.tenants.get(principal.tenant_id), settings)
    keys: list[str] = []
    limits: list[Limit] = []
    names: list[str] = []
    if tenant_limit is not None:
        keys.append(bucket_key(principal.tenant_id))
        limits.append(tenant_limit)
        names.append(f"tenant {principal.tenant_id!r}")
    if key_limit is not None:
        keys.append(bucket_key(principal.tenant_id, principal.key_id))
        limits.append(key_limit)
        names.append(f"API key {principal.key_id} of tenant {principal.tenant_id!r} (per-key limit)")
    return Plan(tuple(keys), tuple(limits), tuple(names)) if keys else None


def cost_of(method: str, request: Any, most: int | None = None) -> int:
    """Tokens a unary request spends (a batch: one per message; an upsert: one per started 8 KiB
    of each document, at least one per document). `most`: what one document may cost at most,
    the smallest burst it is charged to: a document larger than that takes a whole bucket (it
    waits for a full one) rather than being refused for ever, since it cannot be split."""
    if method == _BATCH:
        return len(getattr(request, "messages", ()))
    if method == _UPSERT:
        costs = (
            max(1, -(-doc.ByteSize() // DOCUMENT_TOKEN_BYTES)) for doc in getattr(request, "documents", ())
        )
        return sum(min(cost, most) if most else cost for cost in costs)
    return 1


@dataclass(frozen=True, slots=True)
class OverLimit:
    """A refusal: RESOURCE_EXHAUSTED with a retry-after-ms trailer, or INVALID_ARGUMENT when the
    request can never fit (a batch larger than a burst)."""

    code: grpc.StatusCode
    message: str
    retry_after_ms: int | None


def too_big(plan: Plan, need: int) -> OverLimit | None:
    for name, limit in zip(plan.names, plan.limits, strict=True):
        if need > limit.burst:
            return OverLimit(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this call needs {need} tokens (one per message; a knowledge document one per "
                f"started 8 KiB) but {name} allows bursts of {limit.burst}: send at most "
                f"{limit.burst} messages per call (or split the upsert)",
                None,
            )
    return None


class RateLimiter:
    """Charges calls to their buckets in Redis; fails open."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        timeout = settings.rate_limit_timeout_s
        self._redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=256
        )
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._warned_at = 0.0
        # Plans whose buckets lacked even one token, and until when (monotonic): further calls of
        # that plan are refused here without a Redis call, so a flood costs Redis about one call
        # per retry-after window per process. Safe: other replicas can only spend tokens, never
        # add them (only a stream's give-back can, and it then waits a little longer than needed).
        self._empty_until: dict[Plan, tuple[float, int]] = {}

    def plan(self, registry: Registry, principal: Principal) -> Plan | None:
        return plan_for(registry, self.settings, principal)

    async def acquire(self, plan: Plan, want: int, need: int) -> int | OverLimit:
        """Tokens granted (>= need), or why not. A failing Redis grants `want` (fail open)."""
        refusal = too_big(plan, need)
        if refusal is not None:
            return refusal
        empty = self._empty_until.get(plan)
        if empty is not None:
            left_s = empty[0] - time.monotonic()
            if left_s > 0:
                return self._over(plan, empty[1], need, max(1, math.ceil(left_s * 1000)))
            del self._empty_until[plan]
        args: list[float | int] = [want, need]
        for limit in plan.limits:
            args += [limit.rate, limit.burst]
        try:
            result = await asyncio.wait_for(
                self._take(keys=list(plan.keys), args=args), self.settings.rate_limit_timeout_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed_open(exc)
            return want
        granted, retry_after_ms, limiting = (int(x) for x in result)
        if granted >= need:
            return granted
        index = max(0, limiting - 1)
        if need == 1:
            if len(self._empty_until) >= _MAX_EMPTY_PLANS:
                self._empty_until.clear()
            self._empty_until[plan] = (time.monotonic() + retry_after_ms / 1000, index)
        return self._over(plan, index, need, retry_after_ms)

    def _over(self, plan: Plan, index: int, need: int, retry_after_ms: int) -> OverLimit:
        name, limit = plan.names[index], plan.limits[index]
        RATE_LIMITED.labels("key" if ":key:" in plan.keys[index] else "tenant").inc()
        return OverLimit(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{name} is over its rate limit of {limit.describe()}: this call needs {need} "
            f"token{'s' if need != 1 else ''}; retry after {retry_after_ms} ms",
            retry_after_ms,
        )

    async def give_back(self, plan: Plan, tokens: int) -> None:
        """Return a stream's unused lease (best effort: a lost one costs the tenant a few tokens)."""
        if tokens <= 0:
            return
        try:
            await asyncio.wait_for(
                self._give_back(keys=list(plan.keys), args=[tokens, *(lim.burst for lim in plan.limits)]),
                self.settings.rate_limit_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("rate limiter: giving back %d tokens failed: %r", tokens, exc)

    def _failed_open(self, exc: BaseException) -> None:
        RATE_LIMIT_FAIL_OPEN.inc()
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "rate limiter: Redis failed (%r); letting limited calls through unchecked "
                "(counted in switchboard_rate_limit_fail_open_total)",
                exc,
            )

    async def close(self) -> None:
        await self._redis.aclose()
