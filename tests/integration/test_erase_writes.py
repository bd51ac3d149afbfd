"""Writes to a conversation erased by `switchboard tenant erase`: refused with a clear status.

Before, a SendMessage to an erased conversation was acknowledged by an ingress process that had
the conversation in its in-process registry (nothing told it of the erasure), and then skipped by
every processor: acknowledged, never shown. A StartConversation with the erased id started it
again (its start claim was purged with the rest), equally for nothing.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from switchboard.v1 import agent_pb2, agent_pb2_grpc, chat_pb2, chat_pb2_grpc, events_pb2

from services.settings import Settings
from tests.conftest import System
from tests.integration.test_erase import switchboard
from tests.integration.test_replay import sessions_caught_up

pytestmark = pytest.mark.integration

# Calls on fresh channels: `switchboard ingress` runs two processes on one port, and each keeps
# its own registry; several calls reach both.
CALLS = 8


async def on_fresh_channel(settings: Settings, call: str, request: object) -> object:
    async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
        if call == "SendAgentMessage":
            return await getattr(agent_pb2_grpc.AgentServiceStub(channel), call)(request)
        return await getattr(chat_pb2_grpc.ChatServiceStub(channel), call)(request)


async def refusal(settings: Settings, call: str, request: object) -> tuple[grpc.StatusCode, str]:
    try:
        answer = await on_fresh_channel(settings, call, request)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, str(answer)


def message(tenant: str, cid: str, client_id: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=cid, client_message_id=client_id, text="hello"
    )


@pytest.mark.timeout(600)
async def test_writes_to_an_erased_conversation_are_refused_as_erased(system: System) -> None:
    settings = system.settings
    tenant = f"ew{uuid.uuid4().hex[:8]}"
    victim, other = f"victim-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"

    async def start(customer: str) -> str:
        conv = await on_fresh_channel(
            settings,
            "StartConversation",
            chat_pb2.StartConversationRequest(
                tenant_id=tenant, customer_id=customer, channel=events_pb2.CHANNEL_WEB
            ),
        )
        assert isinstance(conv, chat_pb2.Conversation)
        return str(conv.conversation_id)

    erased, kept = await start(victim), await start(other)
    # Messages through both ingress processes: each knows the conversation (its registry).
    for n in range(CALLS):
        for cid in (erased, kept):
            ack = await on_fresh_channel(settings, "SendMessage", message(tenant, cid, f"before-{n}"))
            assert isinstance(ack, chat_pb2.SendMessageResponse) and not ack.duplicate
    await sessions_caught_up(settings)

    code, out, err = await switchboard(
        system, "tenant", "erase", tenant, "--customer", victim, "--requested-by", "test"
    )
    assert code == 0, f"{out}\n{err[-4000:]}"
    assert "conversations: 1" in out, out

    # Nothing is acknowledged for the erased conversation, by any process, with any call.
    for n in range(CALLS):
        got = await refusal(settings, "SendMessage", message(tenant, erased, f"after-{n}"))
        assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "erased" in got[1], got
        # A retry of a message acknowledged before the erasure is refused too (its ack is gone).
        got = await refusal(settings, "SendMessage", message(tenant, erased, f"before-{n}"))
        assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "erased" in got[1], got
        got = await refusal(
            settings,
            "StartConversation",
            chat_pb2.StartConversationRequest(
                tenant_id=tenant, conversation_id=erased, customer_id=victim, channel=events_pb2.CHANNEL_WEB
            ),
        )
        assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "erased" in got[1], got
        got = await refusal(
            settings,
            "SendAgentMessage",
            agent_pb2.SendAgentMessageRequest(
                tenant_id=tenant,
                conversation_id=erased,
                agent_id="agent-1",
                client_message_id=f"a{n}",
                text="hi",
            ),
        )
        assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "erased" in got[1], got
        # A batch: that message refused with the same code (the kept one's written).
        batch = await on_fresh_channel(
            settings,
            "SendMessageBatch",
            chat_pb2.SendMessageBatchRequest(
                messages=[message(tenant, erased, f"batch-{n}"), message(tenant, kept, f"batch-{n}")]
            ),
        )
        assert isinstance(batch, chat_pb2.SendMessageBatchResponse)
        refused, written = batch.results
        assert refused.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0], refused
        assert "erased" in refused.error_message, refused
        assert written.error_code == 0 and written.offset >= 0, written
    # Closing it says so as well.
    got = await refusal(
        settings,
        "CloseConversation",
        chat_pb2.CloseConversationRequest(tenant_id=tenant, conversation_id=erased),
    )
    assert got[0] == grpc.StatusCode.FAILED_PRECONDITION and "erased" in got[1], got
