"""An ingress whose Kafka producer's sender task ended: its writes of unknown outcome are left to the
dead-process take-over, and the process stops so that a fresh one (its supervisor's) writes on.

aiokafka's sender routine ends for good on an error it does not expect (it logs "Unexpected error
in sender routine" and fails every batch it holds with `KafkaError('Unexpected error during batch
delivery')`), including batches whose produce request Kafka may already have written. Before, the
ingress took that failure for a refusal: it dropped the claims (a retry wrote the message a second
time, with a new event id, answered duplicate=false) and kept the dead producer, so every later
write was refused UNAVAILABLE until someone restarted the process.

The fault is made by hand: the sender's next produce request is written to Kafka (its answer
awaited), then the task raises, as an unexpected error in aiokafka's own code would.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from aiokafka.producer.sender import SendProduceReqHandler
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from services.ingress import IngressServer
from services.ingress._server import FAILED_EXIT_CODE, serve_until_stopped
from services.processes import wait_for_ingress
from tests.conftest import System, eventually, start_conversation
from tests.integration.test_ingress_guarantees import ingress_settings

pytestmark = pytest.mark.integration


def _lands_then_fails(sender: Any) -> None:
    """The sender's next produce request reaches Kafka, then its task ends on a RuntimeError."""

    async def send_produce_req(node_id: int, batches: Any) -> None:
        request = SendProduceReqHandler(sender, batches).create_request()
        await sender.client.send(node_id, request)
        raise RuntimeError("an unexpected error in the sender routine (made by the test)")

    sender._send_produce_req = send_produce_req


@pytest.mark.timeout(240)
async def test_a_producer_whose_sender_ended_stops_the_process_and_a_retry_gets_the_landed_ack(
    system: System,
) -> None:
    tenant = f"sender-ended-{uuid.uuid4().hex[:8]}"
    settings = ingress_settings(system.settings)
    server = IngressServer(settings)
    await server.start()
    code: int | None = None
    try:
        await wait_for_ingress(settings)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            conversation = await start_conversation(chat, tenant)

            def request(cmid: str) -> chat_pb2.SendMessageRequest:
                return chat_pb2.SendMessageRequest(
                    tenant_id=tenant, conversation_id=conversation, client_message_id=cmid, text=cmid
                )

            first = await chat.SendMessage(request("m1"))
            assert not first.duplicate
            assert server.producer._producer is not None
            _lands_then_fails(server.producer._producer._sender)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await chat.SendMessage(request("m2"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "same client_message_id" in (refused.value.details() or ""), refused.value.details()
        # The process does not go on with a producer that can no longer write: it drains, ends its
        # lease and exits with a failure code, for its supervisor to start a fresh one.
        code = await asyncio.wait_for(serve_until_stopped(server, asyncio.Event()), timeout=60)
        assert code == FAILED_EXIT_CODE
    finally:
        if code is None:
            await server.stop(grace=1)

    # A fresh process (the supervisor's restart): the retry of m2 gets the record that landed.
    server = IngressServer(settings)
    await server.start()
    try:
        await wait_for_ingress(settings)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            view = await eventually(
                lambda: chat.GetConversation(
                    chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation)
                ),
                lambda v: any(m.client_message_id == "m2" for m in v.messages),
                within_s=30,
                what="m2, written to Kafka by the ended sender, folded",
            )
            (landed,) = [m for m in view.messages if m.client_message_id == "m2"]

            async def retry() -> chat_pb2.SendMessageResponse | None:
                try:
                    return await chat.SendMessage(request("m2"))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return None

            again = await eventually(retry, lambda r: r is not None, within_s=60, what="m2's retry answered")
            assert again is not None
            assert again.duplicate and again.event_id == landed.event_id, (again, landed)
            third = await chat.SendMessage(request("m3"))
            assert not third.duplicate
    finally:
        await server.stop(grace=1)
