"""The token-bucket math of services/auth/_limits.py (pure; the Lua script mirrors it and the
integration test runs that one on Redis)."""

from __future__ import annotations

import grpc
import pytest

from services.auth._limits import (
    Bucket,
    Limit,
    Plan,
    check_limit_settings,
    cost_of,
    limits_of,
    make_limit,
    refill,
    take,
    too_big,
)
from services.auth._model import TenantRecord
from services.settings import Settings

TEN = Limit(rate=10.0, burst=20)


def test_a_new_bucket_is_full_and_refills_at_the_rate_up_to_the_burst() -> None:
    assert refill(None, TEN, 1_000) == 20
    assert refill(Bucket(0.0, 1_000), TEN, 1_250) == pytest.approx(2.5)
    assert refill(Bucket(5.0, 1_000), TEN, 60_000) == 20
    # Redis's clock never goes back, but a stale state must not mint tokens if it did.
    assert refill(Bucket(3.0, 2_000), TEN, 1_000) == 3.0


def test_take_grants_all_or_nothing_and_says_when_to_retry() -> None:
    first = take([None], [TEN], 0, want=15, need=15)
    assert first.granted == 15 and first.buckets[0].tokens == 5
    refused = take(first.buckets, [TEN], 0, want=8, need=8)
    assert refused.granted == 0
    # 3 tokens missing at 10/s: 300 ms; nothing is charged by a refusal.
    assert refused.retry_after_ms == 300 and refused.buckets == first.buckets
    later = take(refused.buckets, [TEN], refused.retry_after_ms, want=8, need=8)
    assert later.granted == 8 and later.buckets[0].tokens == pytest.approx(0.0)


def test_a_lease_takes_what_is_there_from_need_up_to_want() -> None:
    state = [Bucket(3.7, 0)]
    lease = take(state, [TEN], 0, want=32, need=1)
    assert lease.granted == 3 and lease.buckets[0].tokens == pytest.approx(0.7)
    empty = take(lease.buckets, [TEN], 0, want=32, need=1)
    assert empty.granted == 0 and empty.retry_after_ms == 30  # 0.3 token at 10/s


def test_both_buckets_are_charged_together_and_the_tighter_one_is_named() -> None:
    key = Limit(rate=2.0, burst=2)
    granted = take([None, None], [TEN, key], 0, want=2, need=2)
    assert granted.granted == 2
    assert [b.tokens for b in granted.buckets] == [18, 0]
    refused = take(granted.buckets, [TEN, key], 0, want=1, need=1)
    assert refused.granted == 0 and refused.limiting == 1 and refused.retry_after_ms == 500
    # The tenant bucket was not charged by the key's refusal.
    assert refused.buckets[0].tokens == 18


def test_retry_after_is_at_least_a_millisecond() -> None:
    fast = Limit(rate=1e6, burst=1)
    refused = take([Bucket(0.9999999, 0)], [fast], 0, want=1, need=1)
    assert refused.granted == 0 and refused.retry_after_ms >= 1


def test_limits_come_from_the_tenant_else_the_defaults_and_zero_is_unlimited() -> None:
    defaults = Settings(tenant_rate_per_s=100, tenant_burst=0, key_rate_per_s=0)
    assert limits_of(None, defaults) == (Limit(100.0, 100), None)
    own = TenantRecord("acme", settings={"rate_per_s": 5, "burst": 7, "key_rate_per_s": 2.5})
    assert limits_of(own, defaults) == (Limit(5.0, 7), Limit(2.5, 3))
    assert limits_of(TenantRecord("x", settings={"rate_per_s": 0}), defaults) == (None, None)
    assert limits_of(None, Settings()) == (None, None)  # shipped default: unlimited
    assert make_limit(0.5, 0) == Limit(0.5, 1)


def test_limit_settings_are_validated() -> None:
    assert check_limit_settings({"rate_per_s": "2.5", "burst": 10.0}) == {"rate_per_s": 2.5, "burst": 10}
    for bad in ({"burst": 1.5}, {"rate_per_s": -1}, {"rate_per_s": float("nan")}, {"speed": 1}):
        with pytest.raises(ValueError):
            check_limit_settings(bad)


def test_a_batch_costs_one_token_per_message_and_one_larger_than_a_burst_is_refused() -> None:
    from switchboard.v1 import chat_pb2

    batch = chat_pb2.SendMessageBatchRequest(messages=[chat_pb2.SendMessageRequest()] * 7)
    assert cost_of("/switchboard.v1.ChatService/SendMessageBatch", batch) == 7
    assert cost_of("/switchboard.v1.ChatService/SendMessage", chat_pb2.SendMessageRequest()) == 1
    plan = Plan(("k",), (Limit(1.0, 5),), ("tenant 'acme'",))
    refusal = too_big(plan, 7)
    assert refusal is not None and refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant 'acme'" in refusal.message and "at most 5" in refusal.message
    assert too_big(plan, 5) is None


async def test_the_limiter_fails_open_when_redis_is_unreachable() -> None:
    import socket

    from prometheus_client import REGISTRY

    from services.auth._limits import RateLimiter

    # A port nothing listens on (bound, then closed): connection refused, as with Redis down.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limiter = RateLimiter(Settings(redis_url=f"redis://127.0.0.1:{port}/0", rate_limit_timeout_s=0.5))
    before = REGISTRY.get_sample_value("switchboard_rate_limit_fail_open_total") or 0.0
    try:
        assert await limiter.acquire(Plan(("k",), (TEN,), ("tenant 'acme'",)), 5, 5) == 5
    finally:
        await limiter.close()
    assert REGISTRY.get_sample_value("switchboard_rate_limit_fail_open_total") == before + 1


def test_one_document_larger_than_the_burst_takes_the_whole_bucket_instead_of_being_refused() -> None:
    # A tenant with --rate 3 (so a burst of 3) upserting one 60 KiB document (8 tokens by size):
    # refused INVALID_ARGUMENT "split the upsert" for ever, though one document cannot be split
    # and the API accepts bodies up to 64 KiB. It waits for a full bucket and takes it instead.
    from switchboard.v1 import knowledge_pb2

    upsert = "/switchboard.v1.KnowledgeService/UpsertDocuments"
    large = knowledge_pb2.Document(document_id="d", title="t", body="x" * (60 * 1024))
    plan = Plan(("k",), (Limit(3.0, 3),), ("tenant 'acme'",))
    one = knowledge_pb2.UpsertDocumentsRequest(documents=[large])
    assert cost_of(upsert, one) == 8
    need = cost_of(upsert, one, most=3)
    assert need == 3 and too_big(plan, need) is None
    # Several documents still pay by size, each up to a bucket; a call past the burst is split.
    two = knowledge_pb2.UpsertDocumentsRequest(documents=[large, knowledge_pb2.Document(document_id="s")])
    assert cost_of(upsert, two, most=3) == 4
    assert too_big(plan, 4) is not None
