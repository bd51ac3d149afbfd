"""An ingress whose Kafka producer's sender task ended: its writes of unknown outcome are left to the
dead-process take-over, and the process stops so that a fresh one (its supervisor's) writes on.

aiokafka's sender routine ends for good on an error it does not expect (it logs "Unexpected error
in sender routine" and fails every batch it holds with `KafkaError('Unexpected error during batch
delivery')`), including batches whose produce request Kafka may already have written. Before, the
ingress took that failure for a refusal: it dropped the claims (a retry that came before the
sessions worker folded the landed record wrote the message a second time, under a new event id,
answered duplicate=false) and kept the dead producer, so every later write was refused UNAVAILABLE
until someone restarted the process.

The fault is made by hand: the sender's next produce request is written to Kafka (its answer
awaited), then the task raises, as an unexpected error in aiokafka's own code would. The sessions
worker is stopped meanwhile, so that nothing but the ingress's own handling keeps the claim.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka.producer.sender import SendProduceReqHandler
from switchboard.v1 import chat_pb2, chat_pb2_grpc

from schemas import hotview as hv
from services.ingress import IngressServer
from services.ingress._knowledge import KnowledgeProducer, deleted
from services.ingress._producer import Unavailable
from services.ingress._server import FAILED_EXIT_CODE, serve_until_stopped
from services.processes import wait_for_ingress
from services.settings import Settings
from tests.conftest import System, eventually, start_conversation
from tests.integration.test_ingress_guarantees import ingress_settings

pytestmark = pytest.mark.integration


def _lands_then_fails(sender: Any, before_failing: Callable[[], Awaitable[None]] | None = None) -> None:
    """The sender's next produce request reaches Kafka, then its task ends on a RuntimeError
    (after `before_failing`, when given)."""

    async def send_produce_req(node_id: int, batches: Any) -> None:
        request = SendProduceReqHandler(sender, batches).create_request()
        await sender.client.send(node_id, request)
        if before_failing is not None:
            await before_failing()
        raise RuntimeError("an unexpected error in the sender routine (made by the test)")

    sender._send_produce_req = send_produce_req


@pytest.fixture
async def no_fold(system: System) -> AsyncIterator[None]:
    """The sessions worker stopped (started again after the test)."""
    await asyncio.to_thread(system.children["sessions"].stop)
    try:
        yield
    finally:
        if not system.children["sessions"].alive:
            await asyncio.to_thread(system.children["sessions"].start)


def _message(tenant: str, conversation: str, cmid: str) -> chat_pb2.SendMessageRequest:
    return chat_pb2.SendMessageRequest(
        tenant_id=tenant, conversation_id=conversation, client_message_id=cmid, text=cmid
    )


async def _retry(chat: chat_pb2_grpc.ChatServiceStub, req: chat_pb2.SendMessageRequest) -> Any:
    """The response, or the status code of a refusal."""
    try:
        return await chat.SendMessage(req)
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@pytest.mark.timeout(300)
async def test_a_producer_whose_sender_ended_stops_the_process_and_a_retry_gets_the_landed_ack(
    system: System,
) -> None:
    tenant = f"sender-ended-{uuid.uuid4().hex[:8]}"
    settings = ingress_settings(system.settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    server = IngressServer(settings)
    await server.start()
    code: int | None = None
    try:
        await wait_for_ingress(settings)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            conversation = await start_conversation(chat, tenant)
            assert not (await chat.SendMessage(_message(tenant, conversation, "m1"))).duplicate
            await asyncio.to_thread(system.children["sessions"].stop)  # nothing folds m2 meanwhile
            assert server.producer._producer is not None
            _lands_then_fails(server.producer._producer._sender)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await chat.SendMessage(_message(tenant, conversation, "m2"))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "may have been written" in (refused.value.details() or ""), refused.value.details()
            # New writes are refused at once, not handed to the dead producer.
            later = await _retry(chat, _message(tenant, conversation, "m3"))
            assert later == grpc.StatusCode.UNAVAILABLE, later
        # The process does not go on with a producer that can no longer write: it drains, ends its
        # lease and exits with a failure code, for its supervisor to start a fresh one.
        code = await asyncio.wait_for(serve_until_stopped(server, asyncio.Event()), timeout=60)
        assert code == FAILED_EXIT_CODE
    finally:
        if code is None:
            await server.stop(grace=1)
    try:
        # m2 is in Kafka and nothing folded it: its claim must still be the dead attempt's.
        claim = await redis.get(hv.idempotency_key(tenant, conversation, "m2"))
        assert claim is not None and cast(bytes, claim).startswith(hv.CLAIM_PENDING), claim
        assert await redis.get(hv.idempotency_key(tenant, conversation, "m3")) is None  # never written

        # A fresh process (the supervisor's restart).
        server = IngressServer(settings)
        await server.start()
        try:
            await wait_for_ingress(settings)
            async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
                chat = chat_pb2_grpc.ChatServiceStub(channel)
                # Before the fold: not written again, the retry waits for the log to be read.
                early = await _retry(chat, _message(tenant, conversation, "m2"))
                assert early == grpc.StatusCode.UNAVAILABLE, early
                await asyncio.to_thread(system.children["sessions"].start)
                again = await eventually(
                    lambda: _retry(chat, _message(tenant, conversation, "m2")),
                    lambda r: not isinstance(r, grpc.StatusCode),
                    within_s=60,
                    what="m2's retry answered once the log is folded",
                )
                view = await chat.GetConversation(
                    chat_pb2.GetConversationRequest(tenant_id=tenant, conversation_id=conversation)
                )
                copies = [m.event_id for m in view.messages if m.client_message_id == "m2"]
                assert copies == [again.event_id] and again.duplicate, (again, copies)
                third = await chat.SendMessage(_message(tenant, conversation, "m3"))
                assert not third.duplicate
        finally:
            await server.stop(grace=1)
    finally:
        await redis.aclose()
        if not system.children["sessions"].alive:
            await asyncio.to_thread(system.children["sessions"].start)


@pytest.mark.timeout(300)
async def test_a_sender_that_ends_while_the_process_stops_keeps_the_claims_it_held(
    system: System, no_fold: None
) -> None:
    """A SIGTERM drain flushes the producer; a sender ending then is no different (it used to be
    ignored once the producer was stopping, and its records' claims were dropped as refused)."""
    tenant = f"sender-stop-{uuid.uuid4().hex[:8]}"
    settings = ingress_settings(system.settings)
    redis = aioredis.Redis.from_url(settings.redis_url)
    server = IngressServer(settings)
    await server.start()
    stopped = False
    try:
        await wait_for_ingress(settings)
        async with grpc.aio.insecure_channel(settings.grpc_listen) as channel:
            chat = chat_pb2_grpc.ChatServiceStub(channel)
            conversation = await start_conversation(chat, tenant)
            sent, stopping = asyncio.Event(), asyncio.Event()
            stop = server.producer.stop

            async def stop_noted() -> None:
                stopping.set()
                await stop()  # runs up to its flush before `once_stopping` goes on

            server.producer.stop = stop_noted  # type: ignore[method-assign]

            async def once_stopping() -> None:
                sent.set()
                await stopping.wait()

            assert server.producer._producer is not None
            _lands_then_fails(server.producer._producer._sender, once_stopping)
            call = asyncio.ensure_future(chat.SendMessage(_message(tenant, conversation, "m1")))
            await asyncio.wait_for(sent.wait(), 10)
            await server.stop(grace=1)
            stopped = True
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        claim = await redis.get(hv.idempotency_key(tenant, conversation, "m1"))
        assert claim is not None and cast(bytes, claim).startswith(hv.CLAIM_PENDING), claim
    finally:
        if not stopped:
            await server.stop(grace=1)
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_the_knowledge_producer_is_replaced_once_its_sender_ended(local_stack: Settings) -> None:
    """Documents hold no claims (idempotent by id): a new producer is all it takes. It used to be
    kept, and every later KnowledgeService write was UNAVAILABLE until the process restarted."""
    producer = KnowledgeProducer(local_stack)
    try:
        await producer.write([deleted("sender-ended", "d0")])
        assert producer._producer is not None
        _lands_then_fails(producer._producer._sender)
        with pytest.raises(Unavailable):
            await producer.write([deleted("sender-ended", "d1")])
        (ack,) = await producer.write([deleted("sender-ended", "d1")])
        assert ack.document_id == "d1" and ack.offset >= 0
    finally:
        await producer.stop()
