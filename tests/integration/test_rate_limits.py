"""Rate limits on real servers: two ingress replicas of their own (their own tenants topic, as in
test_auth), one Redis between them. Limits are set with `switchboard tenants create|update`."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.v1 import chat_pb2, chat_pb2_grpc, events_pb2

from tests.integration.conftest import System, eventually
from tests.integration.test_auth import Replicas, cli, issue, keyed_replicas

pytestmark = pytest.mark.integration

_OFFSET = int(os.environ.get("SWITCHBOARD_TEST_PORT_OFFSET", "0"))
REPLICA_PORTS = (25091 + _OFFSET, 25092 + _OFFSET)


@pytest.fixture(scope="module")
async def limited(system: System) -> AsyncIterator[Replicas]:
    async with keyed_replicas(system, "rl", REPLICA_PORTS) as started:
        yield started


async def tenant_with(replicas: Replicas, *limits: str) -> tuple[str, str]:
    """A new tenant with these `tenants create` options, and a key of it known to both replicas."""
    tenant = f"rl-{uuid.uuid4().hex[:8]}"
    done = await asyncio.to_thread(cli, replicas.env, "tenants", "create", tenant, *limits)
    assert done.returncode == 0, done.stderr
    return tenant, await issue(replicas, tenant)


def message(conversation_id: str, cmid: str = "") -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        conversation_id=conversation_id, client_message_id=cmid or uuid.uuid4().hex, text="hi"
    )


async def outcome(call: object) -> tuple[grpc.StatusCode, str, int | None]:
    """(code, details, retry-after-ms trailer) of a unary call."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        trailer = dict(err.trailing_metadata() or ()).get("retry-after-ms")
        return err.code(), err.details() or "", int(trailer) if trailer is not None else None
    return grpc.StatusCode.OK, "", None


async def test_a_tenant_over_its_limit_is_refused_on_every_replica_and_served_after_the_retry_after(
    limited: Replicas,
) -> None:
    # 0.5 messages/s: the bucket barely refills while the test runs, whatever the machine's load.
    tenant, key = await tenant_with(limited, "--rate", "0.5", "--burst", "8")
    _, other_key = await tenant_with(limited, "--rate", "0")
    async with (
        limited.channel(0, key) as c0,
        limited.channel(1, key) as c1,
        limited.channel(0, other_key) as o0,
    ):
        stubs = [chat_pb2_grpc.ChatServiceStub(c0), chat_pb2_grpc.ChatServiceStub(c1)]
        started = time.monotonic()
        conv = await stubs[0].StartConversation(
            chat_pb2.StartConversationRequest(channel=events_pb2.CHANNEL_WEB, customer_id="c")
        )
        # Alternate the replicas: one budget between them, not one each.
        seen = [await outcome(stubs[i % 2].SendMessage(message(conv.conversation_id))) for i in range(20)]
        elapsed = time.monotonic() - started
        accepted = sum(1 for code, _, _ in seen if code is grpc.StatusCode.OK)
        # At most the burst (less what issuing the key spent) plus what refilled meanwhile; per-replica
        # buckets would have let through up to 16.
        assert accepted <= 8 + 0.5 * elapsed + 1, (accepted, elapsed)
        refusals = [(i % 2, s) for i, s in enumerate(seen) if s[0] is not grpc.StatusCode.OK]
        assert {replica for replica, _ in refusals} == {0, 1}, seen
        for _, (code, details, retry_after_ms) in refusals:
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert f"tenant {tenant!r}" in details and "0.5 messages/s (burst 8)" in details, details
            assert retry_after_ms is not None and 1 <= retry_after_ms <= 2000, retry_after_ms

        # Another tenant on the same replicas is not held back at all.
        theirs = chat_pb2_grpc.ChatServiceStub(o0)
        their_conv = await theirs.StartConversation(
            chat_pb2.StartConversationRequest(channel=events_pb2.CHANNEL_WEB, customer_id="c")
        )
        batch = chat_pb2.SendMessageBatchRequest(
            messages=[message(their_conv.conversation_id) for _ in range(50)]
        )
        results = (await theirs.SendMessageBatch(batch)).results
        assert [r.error_code for r in results] == [0] * 50

        # Waiting as long as the last refusal said is enough.
        code, _, retry_after_ms = await outcome(stubs[1].SendMessage(message(conv.conversation_id)))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms is not None
        await asyncio.sleep(retry_after_ms / 1000)
        code, details, _ = await outcome(stubs[1].SendMessage(message(conv.conversation_id)))
        assert code is grpc.StatusCode.OK, details

        # A batch is charged its n tokens in one check: 3 messages at 0.5/s is ~6 s away.
        three = chat_pb2.SendMessageBatchRequest(messages=[message(conv.conversation_id) for _ in range(3)])
        code, details, retry_after_ms = await outcome(stubs[0].SendMessageBatch(three))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert retry_after_ms is not None and 4000 < retry_after_ms <= 6000, retry_after_ms
        # One larger than the burst could never pass: INVALID_ARGUMENT saying what would.
        nine = chat_pb2.SendMessageBatchRequest(messages=[message(conv.conversation_id) for _ in range(9)])
        code, details, _ = await outcome(stubs[0].SendMessageBatch(nine))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "at most 8 messages" in details, details

        # A stream over the limit ends with RESOURCE_EXHAUSTED and the trailer too. One message:
        # with more, the client may still be writing when the server ends the call, and grpc.aio
        # then reports its failed write (INTERNAL, "execute_batch") instead of the server's status.
        call = stubs[1].SendMessages(iter([message(conv.conversation_id)]))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in call:
                pass
        assert ended.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, ended.value.details()
        assert "retry-after-ms" in dict(ended.value.trailing_metadata() or ())


async def test_each_key_has_its_own_limit_and_an_update_applies_live(limited: Replicas) -> None:
    tenant, first = await tenant_with(limited, "--key-rate", "0.2", "--key-burst", "4")
    second = await issue(limited, tenant)
    async with limited.channel(0, first) as a, limited.channel(1, second) as b:
        one, two = chat_pb2_grpc.ChatServiceStub(a), chat_pb2_grpc.ChatServiceStub(b)
        conv = await two.StartConversation(
            chat_pb2.StartConversationRequest(channel=events_pb2.CHANNEL_WEB, customer_id="c")
        )
        seen = [await outcome(one.SendMessage(message(conv.conversation_id))) for _ in range(6)]
        refused = [s for s in seen if s[0] is not grpc.StatusCode.OK]
        assert refused, seen
        key_id = first.split("_")[1]
        assert f"API key {key_id} of tenant {tenant!r}" in refused[0][1], refused[0]
        # The tenant's other key still has its own budget.
        code, details, _ = await outcome(two.SendMessage(message(conv.conversation_id)))
        assert code is grpc.StatusCode.OK, details

        # Lifting the limit reaches every replica through the tenants topic.
        done = await asyncio.to_thread(cli, limited.env, "tenants", "update", tenant, "--key-rate", "0")
        assert done.returncode == 0, done.stderr
        assert "key_rate_per_s=0" in done.stdout
        # `create` of an existing tenant changes nothing and says how to.
        again = await asyncio.to_thread(cli, limited.env, "tenants", "create", tenant, "--rate", "1")
        assert again.returncode == 0 and "limits unchanged" in again.stdout, again.stdout
        listed = await asyncio.to_thread(cli, limited.env, "tenants", "list", "--json")
        mine = [t for t in json.loads(listed.stdout) if t["tenant_id"] == tenant]
        assert mine[0]["settings"] == {"key_rate_per_s": 0.0, "key_burst": 4}, mine

        async def first_key() -> grpc.StatusCode:
            return (await outcome(one.SendMessage(message(conv.conversation_id))))[0]

        await eventually(first_key, lambda c: c is grpc.StatusCode.OK, within_s=10, what="the update")
