"""A burst of calls on one connection, larger than gRPC's own queue of calls not yet handed to
the server (C-core's `grpc.server.max_pending_requests`, 1,000, and its hard limit, 3,000).

Seen (a new user's trial, `make run`): 3,000 concurrent GetConversation calls on one channel, 717
ended CANCELLED with the details "CANCELLED", no trailers and nothing in ingress.log; 5,000: 1,848;
1,500 live StreamConversation calls on one channel, 26-53 ended at once. The ingress admits far
more (`maximum_concurrent_rpcs`), and refuses past that with RESOURCE_EXHAUSTED; C-core cancelled
the excess of its pending queue before any of that was asked."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from tests.conftest import System, start_conversation

pytestmark = pytest.mark.integration

BURST = 3000


@pytest.mark.timeout(300)
async def test_a_burst_of_calls_on_one_connection_is_answered_not_cancelled(
    system: System, stub, tenant: str
) -> None:
    cid = await start_conversation(stub, tenant)
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        burst = chat_pb2_grpc.ChatServiceStub(channel)
        await channel.channel_ready()
        request = chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=cid)

        async def one() -> str:
            try:
                await burst.GetConversation(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        codes = Counter(await asyncio.gather(*(one() for _ in range(BURST))))
    assert codes == Counter({"OK": BURST}), codes
